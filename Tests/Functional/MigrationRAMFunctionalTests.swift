import Foundation
import QMPWire
import TestKit
import Testing

/// issue 8 §1b: a normal migration into a target whose RAM file already holds something
/// (a file filled with 0xFF, or one left by an earlier guest). The source leaves zero
/// pages out, so the target must not keep what its file held there. Both sides map
/// their own file with share=on, so the host can compare the two RAMs page by page once
/// both are stopped: what a user of those files sees.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct MigrationRAMFunctionalTests {
    enum Leftover: String, CaseIterable, Sendable {
        case filledWithFF
        case earlierBoot
        /// The target maps its 0xFF file with share=off: the guest must see zeros, and the
        /// file must stay as it was (a private mapping never writes it).
        case filledWithFFPrivate
    }

    static let ramSize = 64 << 20

    static func fileBackend(_ path: String, share: Bool = true) -> [String] {
        ["-object", "memory-backend-file,id=ram0,size=64M,mem-path=\(path),share=\(share ? "on" : "off")", "-machine", "memory-backend=ram0"]
    }

    /// Pages (by guest-physical address, low RAM starts at 0) where the two files differ.
    static func differingPages(_ a: String, _ b: String) throws -> [Int] {
        let left = try Data(contentsOf: URL(fileURLWithPath: a))
        let right = try Data(contentsOf: URL(fileURLWithPath: b))
        guard left.count == ramSize, right.count == ramSize else {
            throw FixtureError("RAM files are \(left.count) and \(right.count) bytes, expected \(ramSize)")
        }
        var differing: [Int] = []
        for page in stride(from: 0, to: ramSize, by: 4096) where left[page..<page + 4096] != right[page..<page + 4096] {
            differing.append(page)
        }
        return differing
    }

    /// The guest's `scribble` on a fresh 1 MiB area prints round 1; on a page one of its
    /// earlier runs left behind it continues from that round.
    static func expectFreshScribbleArea(_ vm: Machine) async throws {
        let output = try await vm.console.run("scribble 1", timeout: .seconds(30))
        let lines = output.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
        #expect(lines.contains("scribble ok, round 1"), "\(output.debugDescription)")
    }

    @Test(arguments: Leftover.allCases)
    func targetRAMMatchesTheSourceWhateverItsFileHeld(leftover: Leftover) async throws {
        let sourceRAM = "/dev/shm/vmm-ram-src-\(getpid())-\(leftover)"
        let targetRAM = "/dev/shm/vmm-ram-dst-\(getpid())-\(leftover)"
        defer {
            unlink(sourceRAM)
            unlink(targetRAM)
        }
        let socketDirectory = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: socketDirectory) }
        let uri = "unix:\(socketDirectory)/migration.sock"
        try await withArtifacts { artifacts in
            switch leftover {
            case .filledWithFF, .filledWithFFPrivate:
                #expect(FileManager.default.createFile(atPath: targetRAM, contents: Data(repeating: 0xFF, count: Self.ramSize)))
            case .earlierBoot:
                // A guest boots on the file, leaves round 50 in its scribble area, and quits.
                var earlier = MachineOptions.bundledGuest(arguments: Self.fileBackend(targetRAM))
                earlier.name = "earlier"
                let vm = try await Machine.launch(earlier, in: artifacts)
                try await vm.console.waitForPrompt(timeout: .seconds(20))
                try await vm.console.run("scribble 50", expect: "scribble ok, round 50", timeout: .seconds(60))
                #expect(await vm.shutdown() == .exited(0))
            }
            var sourceOptions = MachineOptions.bundledGuest(arguments: Self.fileBackend(sourceRAM))
            sourceOptions.name = "source"
            var targetOptions = MachineOptions.bundledGuest(arguments: Self.fileBackend(targetRAM, share: leftover != .filledWithFFPrivate) + ["-incoming", "defer"])
            targetOptions.name = "target"
            let source = try await Machine.launch(sourceOptions, in: artifacts)
            let target = try await Machine.launch(targetOptions, in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            try await SerializedNetworkSuites.MigrationFunctionalTests.enableEvents(source, target)
            try await MigrationPair.migrate(from: source, to: target, uri: uri, timeout: .seconds(60))

            if leftover == .filledWithFFPrivate {
                let file = try Data(contentsOf: URL(fileURLWithPath: targetRAM))
                #expect(file.count == Self.ramSize && file.allSatisfy { $0 == 0xFF }, "the target wrote its share=off RAM file")
            } else {
                // Both stopped (postmigrate, paused): their RAM must be the same, page for page.
                let differing = try Self.differingPages(sourceRAM, targetRAM)
                #expect(differing.isEmpty, "\(differing.count) pages differ, first at \(differing.prefix(8).map { String($0, radix: 16) })")
            }

            try await target.qmp.execute("cont")
            try await Self.expectFreshScribbleArea(target)
            _ = await source.shutdown()
            _ = await target.shutdown()
        }
    }

    /// The shared-RAM case is unchanged: with x-ignore-shared and the same file on both
    /// sides nothing is copied and nothing emptied. Without x-ignore-shared, copying RAM
    /// into the file the source runs on would overwrite the running guest: refused.
    @Test func copyingRAMIntoTheSourcesOwnFileIsRefused() async throws {
        let ram = "/dev/shm/vmm-ram-same-\(getpid())"
        defer { unlink(ram) }
        let socketDirectory = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: socketDirectory) }
        let uri = "unix:\(socketDirectory)/migration.sock"
        try await withArtifacts { artifacts in
            var sourceOptions = MachineOptions.bundledGuest(arguments: Self.fileBackend(ram))
            sourceOptions.name = "source"
            var targetOptions = MachineOptions.bundledGuest(arguments: Self.fileBackend(ram) + ["-incoming", "defer"])
            targetOptions.name = "target"
            let source = try await Machine.launch(sourceOptions, in: artifacts)
            let target = try await Machine.launch(targetOptions, in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            try await source.console.run("scribble 3", expect: "scribble ok, round 3", timeout: .seconds(30))
            try await SerializedNetworkSuites.MigrationFunctionalTests.enableEvents(source, target)
            try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
            try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
            _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
            #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
            let log = target.stderrTail(20).joined(separator: "\n")
            #expect(log.contains("the source copies its RAM into \(ram), the file this machine maps shared too"), "\(log)")
            // The source's RAM is intact: its guest carries on from round 3.
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            try await source.console.run("scribble 1", expect: "scribble ok, round 4", failure: "holds round", timeout: .seconds(30))
        }
    }
}
