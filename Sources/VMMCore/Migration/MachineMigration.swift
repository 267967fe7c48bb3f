import CLinux
import Glibc
import QMPWire

/// What source and target share: the configuration both must agree on, the status
/// reporting, and the sections that describe a stopped machine. The source side lives
/// in MigrationSource.swift, the target side in MigrationTarget.swift.
extension Machine {
    static let acknowledgement: UInt8 = 0x06
    /// The target's answer to the switch-over section: it is caught up and polling.
    static let readyToSwitchOver: UInt8 = 0x05

    /// What must agree between source and target before any state is loaded.
    func machineDescription() -> MachineDescription {
        let context = handoverContext
        let devices = devices.compactMap { $0.configuration(context) }
        // cpr-transfer passes fds by itself (004's rule): `local` does not apply there.
        let local = isLocalMigration && !isCPRTransfer
        var properties = ["ram-size": String(memory.size), "vcpus": "1", "local": local ? "on" : "off"]
        // Only cpr-transfer adds the mode: streams of the other modes stay as they were.
        if isCPRTransfer { properties["mode"] = "cpr-transfer" }
        if let file = memory.fileIdentity { properties["ram-file"] = file }
        return MachineDescription(properties: properties, devices: devices)
    }

    var isLocalMigration: Bool { migration.parameters["local"]?.boolValue == true }

    /// The source's `mode` parameter, or a target that received a cpr state (its
    /// command-line flow sets no parameter: the cpr channel says it all, as in QEMU).
    var isCPRTransfer: Bool {
        migration.incoming?.cprState != nil || migration.parameters["mode"]?.stringValue == "cpr-transfer"
    }

    var handoverContext: HandoverContext {
        HandoverContext(mode: isCPRTransfer ? .cprTransfer : isLocalMigration ? .local : .normal)
    }

    func setMigrationStatus(_ status: MigrationState.Status) {
        migration.status = status
        if migration.capabilities["events"] == true {
            qmp.emit("MIGRATION", data: ["status": .string(status.rawValue)])
        }
    }

    /// vCPU and device sections (with the fds each one passes), taken while the vCPU
    /// is stopped.
    func captureState() throws -> [(MigrationStream.Section, [NamedFD])] {
        let vcpuState = try VCPUState.capture(vcpuRunner.vcpu, msrIndices: VCPUState.savableMSRs(hypervisor: hypervisor))
        let context = handoverContext
        return [(.init(kind: .vcpu, name: "cpu0", payload: vcpuState.encode()), [])] + devices.map { device in
            let (payload, fds) = device.saveSection(context)
            return (.init(kind: .device, name: device.id, payload: payload), fds)
        }
    }
}

/// How guest RAM reaches the target when `x-ignore-shared` lets the source skip it:
/// the memfd itself (passed with the section), or the name and identity of a file
/// both sides map. Anything else sends pages.
enum SharedRAM: Equatable {
    case memfd(size: UInt64)
    case file(path: String, device: UInt64, inode: UInt64, size: UInt64)

    static let kindMemfd: UInt8 = 1
    static let kindFile: UInt8 = 2
    /// The stream-wide name of the RAM memfd.
    static let memfdName = "machine/ram"

    /// The section for `memory` if its RAM may be skipped, nil if pages must be sent.
    static func describing(_ memory: GuestMemory) throws -> SharedRAM? {
        guard memory.shared else { return nil }
        switch memory.backing {
        case .memfd: return .memfd(size: memory.size)
        case .file(let path):
            let st = try memory.backingStatus()
            return .file(path: path, device: UInt64(st.st_dev), inode: UInt64(st.st_ino), size: memory.size)
        }
    }

    func encode() -> [UInt8] {
        var w = StreamWriter()
        switch self {
        case .memfd(let size):
            w.u8(Self.kindMemfd)
            w.u64(size)
        case .file(let path, let device, let inode, let size):
            w.u8(Self.kindFile)
            w.u64(size)
            w.string(path)
            w.u64(device)
            w.u64(inode)
        }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws -> SharedRAM {
        var r = StreamReader(bytes, context: "shared RAM section")
        let kind = try r.u8("kind")
        let size = try r.u64("size")
        let result: SharedRAM
        switch kind {
        case kindMemfd: result = .memfd(size: size)
        case kindFile: result = .file(path: try r.string("path"), device: try r.u64("device"), inode: try r.u64("inode"), size: size)
        default: throw StreamError("shared RAM section of unknown kind \(kind)")
        }
        try r.finish()
        return result
    }

    /// Target side: makes `memory` the source's RAM, or explains why it cannot be.
    func adopt(into memory: GuestMemory, fds: ReceivedFDs) throws {
        switch self {
        case .memfd(let size):
            let memfd = try fds.claim(Self.memfdName, by: "x-ignore-shared")
            guard case .memfd = memory.backing else {
                throw StreamError("x-ignore-shared: the source passes its RAM as a memfd, but this machine's RAM is a file; use memory-backend-memfd on the target")
            }
            guard size == memory.size else {
                throw StreamError("x-ignore-shared: the source's RAM is \(size) bytes, this machine's \(memory.size)")
            }
            try memory.adopt(sharedFD: memfd, backing: .memfd)
        case .file(let path, let device, let inode, _):
            let mine: String
            if case .file(let own) = memory.backing { mine = "file \(own)" } else { mine = "a memfd" }
            let st = try memory.backingStatus()
            guard case .file = memory.backing, memory.shared, UInt64(st.st_dev) == device, UInt64(st.st_ino) == inode else {
                throw StreamError("x-ignore-shared: the source skipped RAM because it maps \(path) shared, but this machine maps \(mine)\(memory.shared ? "" : " privately"); the target must map the same file with share=on")
            }
        }
    }
}
