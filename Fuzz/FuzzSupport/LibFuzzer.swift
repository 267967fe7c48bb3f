import CFuzzDriver
import Glibc

/// The `main` of every fuzz executable. SwiftPM links an executable's `main` to its
/// module's entry point (`--defsym main=<module>_main`), which replaces libFuzzer's own
/// `main`, so the entry point starts libFuzzer's driver itself, on the same
/// `LLVMFuzzerTestOneInput` that libFuzzer's `main` would use.
public func runLibFuzzer(_ test: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> Never {
    var argc = CommandLine.argc
    var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
    exit(fuzz_driver_run(&argc, &argv, test))
}

/// Takes fuzz input apart front to back; past the end every read gives zeros, so a
/// target never has to reject a short input.
public struct FuzzInput {
    public let bytes: [UInt8]
    public private(set) var offset = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: size)) } ?? []
    }

    public var isAtEnd: Bool { offset >= bytes.count }

    public mutating func u8() -> UInt8 {
        defer { offset += 1 }
        return offset < bytes.count ? bytes[offset] : 0
    }

    public mutating func integer<T: FixedWidthInteger>(_: T.Type = T.self) -> T {
        (0..<MemoryLayout<T>.size).reduce(T.zero) { value, shift in value | T(truncatingIfNeeded: u8()) << (8 * shift) }
    }

    /// Everything not read yet.
    public mutating func rest() -> [UInt8] {
        defer { offset = bytes.count }
        return offset < bytes.count ? Array(bytes[offset...]) : []
    }
}
