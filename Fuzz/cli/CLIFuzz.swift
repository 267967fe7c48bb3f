import FuzzSupport
@testable import VMMCore

/// A command line as `vmm` gets it: the input split at NUL bytes into argv (so a seed is
/// `-netdev\0tap,id=n0,...\0-device\0...`), parsed by `VMMConfiguration.parse`, which
/// runs every option's parser (`-netdev`, `-device`, `-object`, `-machine`, `-incoming`,
/// `-serial`/`-qmp` chardevs, `-m`, `-accel`, ...) and then the cross-option checks.
///
/// Beyond "no crash": a configuration that parses is parsed the same way again, and its
/// memory size is what `resolvedMemory` reports (so a later step cannot trap on it).
@main enum FuzzCLI {
    static func main() { runLibFuzzer(fuzz) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = FuzzInput(data, size)
    let argv = input.bytes.split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
    guard let config = try? VMMConfiguration.parse(argv) else { return 0 }
    precondition((try? VMMConfiguration.parse(argv)) == config, "parsing the same command line twice differs")
    _ = try? config.resolvedMemory()
    return 0
}
