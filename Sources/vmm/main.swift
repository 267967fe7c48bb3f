import Glibc
import Logging
import VMMCore

/// `vmm`: boots a PVH guest under KVM with QEMU's command-line spelling.

/// One line on stderr and status 1, as QEMU does for a bad command line.
func failAndExit(_ message: String) -> Never {
    let line = Array("vmm: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
    exit(1)
}
let arguments = Array(CommandLine.arguments.dropFirst())
let config: VMMConfiguration
do {
    config = try VMMConfiguration.parse(arguments)
} catch {
    failAndExit("\(error)")
}

if config.showVersion {
    print("vmm version \(Machine.version.major).\(Machine.version.minor).\(Machine.version.micro) (\(Machine.packageName))")
    exit(0)
}
if config.showHelp {
    print(VMMConfiguration.usage)
    exit(0)
}

let level: Logger.Level
switch getenv("VMM_LOG").map({ String(cString: $0) }) {
case "trace": level = .trace
case "debug": level = .debug
default: level = config.debugLog ? .debug : .info
}
LoggingSystem.bootstrap { label in
    var handler = StreamLogHandler.standardError(label: label)
    handler.logLevel = level
    return handler
}
let logger = Logger(label: "vmm")

let machine: Machine
do {
    machine = try Machine(config: config, logger: logger)
} catch {
    failAndExit("\(error)")
}
do {
    exit(try machine.run())
} catch {
    failAndExit("\(error)")
}
