/// The bundled guest's shell commands as typed calls, so that a test reads values instead
/// of parsing console text. Output formats are listed in docs/testkit.md ("The bundled
/// guest's commands"); every call fails with the console's last lines when the guest
/// answers otherwise.
///
/// ```swift
/// let before = try await vm.guest.ticks()
/// try await vm.guest.configureNetwork(address: "192.168.100.2/24")
/// let stats = try await vm.guest.stats()
/// ```
public struct GuestShell: Sendable {
    public let console: Console

    public init(_ console: Console) { self.console = console }

    /// The guest's idle tick counter (`ticks`): at least one tick per 10 ms of guest time
    /// while the guest is idle, so it only grows while the guest runs.
    public func ticks() async throws -> UInt64 {
        let output = try await console.run("ticks")
        guard let value = Self.firstNumber(in: output) else {
            throw GuestCommandError(command: "ticks", output: output, expected: "a number")
        }
        return value
    }

    /// `ticks` after `delay` more of the caller's time. A migration finishes between two
    /// ticks, so "the count grew on the target" needs some target time first.
    public func ticks(after delay: Duration) async throws -> UInt64 {
        try await Task.sleep(for: delay)
        return try await ticks()
    }

    /// `ip addr add ADDRESS dev DEVICE` then `ip link set DEVICE up`. `address` is CIDR
    /// (`192.168.100.2/24`). The guest finds its NIC during boot; without one it answers
    /// `ip: can't find device`, which fails here.
    public func configureNetwork(address: String, device: String = "eth0", timeout: Duration = .seconds(30)) async throws {
        try await console.run("ip addr add \(address) dev \(device)", failure: "ip: ", timeout: timeout)
        try await console.run("ip link set \(device) up", failure: "ip: ", timeout: timeout)
    }

    /// `ping -c COUNT -W SECONDS ADDRESS` from the guest; the busybox-style summary's counts.
    public func ping(_ address: String, count: Int = 1, waitSeconds: Int = 1, timeout: Duration = .seconds(30)) async throws -> GuestPingResult {
        let command = "ping -c \(count) -W \(waitSeconds) \(address)"
        let output = try await console.run(command, expect: try .regex(#"\d+ packets transmitted, \d+ packets received"#),
                                           failure: .text("ping: "), timeout: timeout)
        try await console.waitForPrompt(timeout: .seconds(5))
        guard let transmitted = Self.numberBefore(" packets transmitted", in: output),
              let received = Self.numberBefore(" packets received", in: output) else {
            throw GuestCommandError(command: command, output: output, expected: "N packets transmitted, M packets received")
        }
        return GuestPingResult(transmitted: transmitted, received: received)
    }

    /// `stats`: frames per queue pair since boot, and the driver's error counters.
    public func stats() async throws -> GuestStats {
        let output = try await console.run("stats", expect: " send drops")
        guard let stats = GuestStats(parsing: output) else {
            throw GuestCommandError(command: "stats", output: output, expected: "rxN: … packets txN: … packets lines and a total line")
        }
        return stats
    }

    /// `scribble ROUNDS`: checks that every page of a 1 MiB area holds the previous round's
    /// number, then writes the next. Returns the round reached. Throws, with the page the
    /// guest named, when a page is a round behind (RAM that a migration failed to carry).
    /// Rounds continue from what the area holds, so a fresh guest starts at round 0.
    @discardableResult
    public func scribble(rounds: Int, timeout: Duration = .seconds(60)) async throws -> UInt64 {
        let command = "scribble \(rounds)"
        let output = try await console.run(command, expect: try .regex(#"scribble ok, round \d+\r?\n"#),
                                           failure: .text("scribble: "), timeout: timeout)
        try await console.waitForPrompt(timeout: .seconds(5))
        guard let round = Self.numberAfter("scribble ok, round ", in: output) else {
            throw GuestCommandError(command: command, output: output, expected: "scribble ok, round N")
        }
        return round
    }

    // MARK: Parsing

    static func firstNumber(in text: String) -> UInt64? {
        text.split(whereSeparator: { !$0.isNumber }).first.flatMap { UInt64($0) }
    }

    static func numbers(in text: String) -> [UInt64] {
        text.split(whereSeparator: { !$0.isNumber }).compactMap { UInt64($0) }
    }

    /// The number right before `marker`: `3` in "3 packets received".
    static func numberBefore(_ marker: String, in text: String) -> Int? {
        guard let range = text.range(of: marker) else { return nil }
        let digits = text[..<range.lowerBound].reversed().prefix { $0.isNumber }
        return Int(String(digits.reversed()))
    }

    /// The number right after `marker`: `12` in "round 12".
    static func numberAfter(_ marker: String, in text: String) -> UInt64? {
        guard let range = text.range(of: marker) else { return nil }
        return UInt64(String(text[range.upperBound...].prefix { $0.isNumber }))
    }
}

/// A guest command answered otherwise than its documented format.
public struct GuestCommandError: Error, CustomStringConvertible {
    public var command: String
    public var output: String
    public var expected: String

    public var description: String { "guest command '\(command)' printed \(output.debugDescription), expected \(expected)" }
}

/// The summary of the guest's `ping`.
public struct GuestPingResult: Sendable, Equatable, CustomStringConvertible {
    public var transmitted: Int
    public var received: Int

    public init(transmitted: Int, received: Int) {
        self.transmitted = transmitted
        self.received = received
    }

    public var description: String { "\(transmitted) packets transmitted, \(received) packets received" }
}

/// The guest's `stats`: frames its virtio-net driver took (rx) and sent (tx) per queue pair.
public struct GuestStats: Sendable, Equatable, CustomStringConvertible {
    public struct Queue: Sendable, Equatable {
        public var received: UInt64
        public var sent: UInt64
    }

    public var queues: [Queue]
    /// Frames the driver dropped as malformed.
    public var bad: UInt64
    /// Frames the driver could not send (TX ring full).
    public var sendDrops: UInt64

    public var received: UInt64 { queues.reduce(0) { $0 + $1.received } }
    public var sent: UInt64 { queues.reduce(0) { $0 + $1.sent } }

    public var description: String {
        queues.enumerated().map { "rx\($0): \($1.received) tx\($0): \($1.sent)" }.joined(separator: ", ")
            + "; \(bad) bad, \(sendDrops) send drops"
    }

    /// Parses `rx0: 5 packets tx0: 3 packets` lines and `total: rx 5 packets tx 3 packets, 0 bad, 0 send drops`.
    init?(parsing output: String) {
        var queues: [Queue] = []
        var bad: UInt64?
        var drops: UInt64?
        for line in output.split(whereSeparator: \.isNewline) {
            let text = String(line)
            if text.hasPrefix("total:") {
                bad = GuestShell.numberBefore(" bad", in: text).map(UInt64.init)
                drops = GuestShell.numberBefore(" send drops", in: text).map(UInt64.init)
            } else if text.hasPrefix("rx"), let rxMarker = text.range(of: ": ") {
                let numbers = GuestShell.numbers(in: String(text[rxMarker.upperBound...]))
                // "rx0: 5 packets tx0: 3 packets" → 5, 0, 3
                guard numbers.count == 3 else { return nil }
                queues.append(Queue(received: numbers[0], sent: numbers[2]))
            }
        }
        guard let bad, let drops, !queues.isEmpty else { return nil }
        self.queues = queues
        self.bad = bad
        sendDrops = drops
    }
}

extension Machine {
    /// The bundled guest's shell on this machine's console.
    public var guest: GuestShell {
        get throws { GuestShell(try console) }
    }
}
