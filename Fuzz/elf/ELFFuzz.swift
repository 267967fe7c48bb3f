import FuzzSupport
@testable import VMMCore

/// The `-kernel` image: `ELFImage` parses the ELF64 header, program headers and notes,
/// then `PVHBoot.load` finds the PVH entry note and copies the segments and the boot
/// data into guest RAM, as `Machine` does at start-up.
///
/// Beyond "no crash": every segment the parser accepts lies inside the file, and a load
/// that succeeds returns the entry point the image's PVH note names.
@main enum FuzzELF {
    static func main() { runLibFuzzer(fuzz) }
}

/// Enough for the bundled guest (it loads at 1 MiB and ends near 3.1 MiB).
nonisolated(unsafe) let memory = try! GuestMemory(size: 4 << 20)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = FuzzInput(data, size)
    guard let image = try? ELFImage(bytes: input.bytes) else { return 0 }
    for segment in image.segments {
        precondition(segment.fileOffset >= 0 && segment.fileSize >= 0 && segment.fileOffset + segment.fileSize <= input.bytes.count,
                     "segment \(segment) extends past the file")
    }
    if let entry = try? PVHBoot.load(image, into: memory, commandLine: "console=ttyS0", flags: PVHBoot.flagHaltWakes) {
        precondition(entry == image.pvhEntry, "load returned entry \(entry), the note says \(String(describing: image.pvhEntry))")
    }
    return 0
}
