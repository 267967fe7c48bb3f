import ArgumentParser

/// `vmm-bench`: numbers for the bundled VMM beside QEMU on the same machine and image.
@main
struct VMMBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vmm-bench",
        abstract: "Benchmarks the bundled VMM against qemu-system-x86_64 with the same guest image.",
        subcommands: [BootBenchmark.self, PingBenchmark.self, MigrationBenchmark.self])
}
