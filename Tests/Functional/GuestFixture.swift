import Foundation
import QMPWire
import TestKit

/// Options for the bundled VMM booting the bundled guest, as most tests want it.
func guestOptions(startPaused: Bool = false, arguments: [String] = [], connectQMP: Bool = true) -> MachineOptions {
    MachineOptions(kernel: BundledGuest.image, memory: "64M", startPaused: startPaused, connectQMP: connectQMP, arguments: arguments)
}

/// The number the guest's `ticks` command prints.
func readTicks(_ console: Console) async throws -> UInt64 {
    let output = try await console.run("ticks")
    let digits = output.split(whereSeparator: { !$0.isNumber }).first.map(String.init) ?? ""
    guard let value = UInt64(digits) else { throw FixtureError("ticks printed no number: \(output.debugDescription)") }
    return value
}

/// `ticks` after 100 ms more of guest time. Ticks count the guest's idle wake-ups (at
/// least one per 10 ms timer), and a migration can now finish between two of them, so
/// "the count grew on the target" needs some target time first.
func readTicksLater(_ console: Console) async throws -> UInt64 {
    try await Task.sleep(for: .milliseconds(100))
    return try await readTicks(console)
}

struct FixtureError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A socket path short enough for sun_path, removed with its directory by the caller.
func temporarySocketDirectory() throws -> String {
    var template = Array("/tmp/fn-XXXXXX".utf8CString)
    guard mkdtemp(&template) != nil else { throw FixtureError("mkdtemp failed") }
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}
