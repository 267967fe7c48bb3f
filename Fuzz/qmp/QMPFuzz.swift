import FuzzSupport
import QMPWire
@testable import VMMCore

/// Bytes as a QMP client sends them: the stream splitter cuts them into messages, each
/// goes through the dispatcher's framing, negotiation and argument checks, and the
/// reply is serialized as the server would write it.
///
/// Checked beyond "no crash": the splitter gives the same messages however the bytes
/// are chunked (the first input byte picks the chunk size), every message gets exactly
/// one reply, and every reply is JSON that parses again (a client must be able to read it).
///
/// The dispatcher here has no `Machine` (that needs /dev/kvm): it registers the VMM's
/// command names with the argument tables the machine uses where those are shared
/// (`NetdevSpec.keys`, `DeviceSpec.keys`), the migration commands parse their
/// `uri`/`channels` with the real `MigrationURI`, and `chardev-add` its nested backend
/// with the real `Machine.socketChardev`. What the other handlers do is not covered here.
@main enum FuzzQMP {
    static func main() { runLibFuzzer(fuzz) }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let chunkSize = Int(input.u8() % 16) + 1
    let bytes = input.rest()

    var whole = JSONStreamSplitter()
    let expected = whole.feed(bytes)
    var chunked = JSONStreamSplitter()
    var outputs: [JSONStreamSplitter.Output] = []
    var start = 0
    while start < bytes.count {
        let end = min(start + chunkSize, bytes.count)
        outputs += chunked.feed(bytes[start..<end])
        start = end
    }
    precondition(outputs == expected, "the splitter's messages depend on how the bytes were chunked")

    var negotiated = false
    for output in outputs {
        guard case .message(let message) = output else { continue }
        let reply = FuzzDispatcher.shared.handle(line: String(decoding: message, as: UTF8.self), negotiated: &negotiated)
        let text = reply.serialized
        do {
            _ = try JSON.parse(text)
        } catch {
            preconditionFailure("reply is not JSON (\(error)): \(text)")
        }
    }
    return 0
}

enum FuzzDispatcher {
    /// libFuzzer calls the target from one thread only.
    nonisolated(unsafe) static let shared: QMPDispatcher = {
        let d = QMPDispatcher()
        d.register("qmp_capabilities", arguments: ["enable": .array]) { _ in [:] }
        for name in ["query-status", "stop", "cont", "query-version", "query-name", "query-kvm", "query-cpus-fast",
                     "query-commands", "query-pci", "migrate_cancel", "query-migrate-capabilities",
                     "query-migrate-parameters", "query-migrate", "query-chardev"] {
            d.register(name) { _ in [:] }
        }
        d.register("getfd", arguments: ["fdname": .string], required: ["fdname"]) { _ in [:] }
        d.register("closefd", arguments: ["fdname": .string], required: ["fdname"]) { _ in [:] }
        d.register("netdev_del", arguments: ["id": .string], required: ["id"]) { _ in [:] }
        let netdevArgs = Dictionary(uniqueKeysWithValues: NetdevSpec.keys.union(NetdevSpec.vhostUserKeys).map { ($0, QMPDispatcher.ArgumentType.any) })
        d.register("netdev_add", arguments: netdevArgs, required: ["type", "id"]) { _ in [:] }
        let deviceArgs = Dictionary(uniqueKeysWithValues: DeviceSpec.keys.map { ($0, QMPDispatcher.ArgumentType.any) })
        d.register("device_add", arguments: deviceArgs, required: ["driver"]) { _ in [:] }
        d.register("chardev-add", arguments: ["id": .string, "backend": .object], required: ["id", "backend"]) { args in
            .string(try Machine.socketChardev(id: args["id"]!.stringValue!, backend: args["backend"]!.objectValue!).described)
        }
        d.register("chardev-remove", arguments: ["id": .string], required: ["id"]) { _ in [:] }
        d.register("migrate", arguments: ["uri": .string, "channels": .array, "detach": .boolean, "resume": .boolean]) { args in
            .string("\(try Machine.migrationChannels(args))")
        }
        d.register("migrate-incoming", arguments: ["uri": .string, "channels": .array, "exit-on-error": .boolean]) { args in
            .string("\(try Machine.migrationChannels(args))")
        }
        d.register("migrate-set-capabilities", arguments: ["capabilities": .array], required: ["capabilities"]) { _ in [:] }
        d.register("migrate-set-parameters", arguments: ["local": .boolean, "mode": .string, "downtime-limit": .integer, "max-bandwidth": .integer]) { _ in [:] }
        return d
    }()
}

