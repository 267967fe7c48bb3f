import Glibc
import Testing
@testable import VMMCore

@Suite struct NetworkOptionsTests {
    @Test func parsesTapNetdevAndVirtioNetDevice() throws {
        let config = try VMMConfiguration.parse([
            "-kernel", "k", "-netdev", "tap,id=n0,ifname=tap0,queues=4,script=no,downscript=no,vnet_hdr=on",
            "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:99,mq=on",
        ])
        #expect(config.netdevs == [NetdevSpec(id: "n0", ifname: "tap0", queues: 4, vnetHeader: true, fds: nil)])
        #expect(config.devices == [DeviceSpec(id: "nic0", netdev: "n0", mac: [0x52, 0x54, 0, 0x12, 0x34, 0x99], multiQueue: true)])
    }

    @Test func acceptsInheritedFDs() throws {
        let fd = open("/dev/null", O_RDONLY)
        defer { close(fd) }
        let spec = try NetdevSpec.parse("tap,id=n0,fds=\(fd):\(fd)", option: "-netdev")
        #expect(spec.fds == [fd, fd] && spec.queues == 2)
    }

    @Test(arguments: [
        ("tap,id=n0,script=/etc/qemu-ifup", "script=/etc/qemu-ifup is not supported"),
        ("tap,id=n0,downscript=/bin/true", "downscript=/bin/true is not supported"),
        ("user,id=n0", "unsupported netdev type 'user'"),
        ("tap,ifname=t", "parameter 'id' is missing"),
        ("tap,id=n0,queues=0", "queues=0 must be 1..256"),
        ("tap,id=n0,fd=999", "fd 999 is not open"),
        ("tap,id=n0,fd=x", "'x' is not a file descriptor number"),
        ("tap,id=n0,colour=red", "unknown parameter 'colour'"),
        ("tap,id=n0,incoming-fds=on", "incoming-fds requires script=no and downscript=no"),
        ("tap,id=n0,incoming-fds=on,script=/etc/qemu-ifup,downscript=no", "incoming-fds requires script=no and downscript=no"),
        ("tap,id=n0,helper=/usr/lib/qemu/qemu-bridge-helper", "helper= is not supported (no bridge helper)"),
        ("tap,id=n0,br=br0", "br= is not supported (no bridge helper)"),
    ])
    func badNetdevsNameOptionAndValue(text: String, fragment: String) {
        #expect(throws: (any Error).self) { try NetdevSpec.parse(text, option: "-netdev") }
        do { _ = try NetdevSpec.parse(text, option: "-netdev") } catch { #expect("\(error)".contains(fragment), "\(error)") }
    }

    /// The series' rule (v13 06/8): each option that opens or configures a TAP conflicts
    /// with incoming-fds, and the message names all of them, in its order.
    @Test(arguments: ["fd=999", "fds=999:998", "helper=/usr/lib/qemu/qemu-bridge-helper", "br=br0", "ifname=tap0", "sndbuf=1048576", "vnet_hdr=on"])
    func incomingFDsConflictNamesEveryOption(option: String) {
        let text = "tap,id=n0,incoming-fds=on,\(option),script=no,downscript=no"
        do {
            _ = try NetdevSpec.parse(text, option: "-netdev")
            Issue.record("accepted \(text)")
        } catch {
            #expect("\(error)" == "-netdev \(text): incoming-fds is incompatible with fd=, fds=, helper=, br=, ifname=, sndbuf= and vnet_hdr=")
        }
    }

    /// An empty script means no script, as in QEMU; the series accepts it beside incoming-fds.
    /// `cpr=on` (default off), as the series spells it; it excludes local migration's `incoming-fds`.
    @Test func cprKey() throws {
        #expect(try NetdevSpec.parse("tap,id=n0,ifname=tap0,queues=4,script=no,downscript=no", option: "-netdev").cpr == false)
        #expect(try NetdevSpec.parse("tap,id=n0,ifname=tap0,queues=4,script=no,downscript=no,cpr=on", option: "-netdev").cpr)
        #expect { try NetdevSpec.parse("tap,id=n0,cpr=maybe", option: "-netdev") } throws: {
            "\($0)".contains("parameter 'cpr' expects 'on' or 'off', not 'maybe'")
        }
        #expect { try NetdevSpec.parse("tap,id=n0,incoming-fds=on,cpr=on,script=no,downscript=no", option: "-netdev") } throws: {
            "\($0)".contains("cpr=on and incoming-fds=on exclude each other")
        }
    }

    @Test(arguments: ["script=,downscript=", "script=no,downscript=", "script=,downscript=no"])
    func emptyScriptsCountAsNo(scripts: String) throws {
        let spec = try NetdevSpec.parse("tap,id=n0,incoming-fds=on,queues=2,\(scripts)", option: "-netdev")
        #expect(spec.incomingFDs && spec.queues == 2)
        #expect(try NetdevSpec.parse("tap,id=n0,ifname=tap0,\(scripts)", option: "-netdev").ifname == "tap0")
    }

    /// The series' device_add, as QMP's arguments become an option string, and its q35
    /// command line: accepted; what has no effect here is said in `notes`.
    @Test func acceptsTheSeriesDeviceAndMachineLines() throws {
        let config = try VMMConfiguration.parse([
            "-kernel", "k", "-machine", "q35", "-device", "pcie-pci-bridge,id=pci.1,bus=pcie.0",
            "-netdev", "tap,id=netdev.1,ifname=tap0,queues=4,vnet_hdr=on,script=no,downscript=no",
            "-device", "virtio-net-pci,romfile=,id=vnet.1,netdev=netdev.1,mq=on,vectors=18,bus=pci.1,mac=d6:0d:75:f8:0f:b7,disable-legacy=off,local-migration=on",
        ])
        #expect(config.pciBridges == ["pci.1"])
        let device = try #require(config.devices.first)
        #expect(device.bus == "pci.1" && device.vectors == 18 && device.romfile == "" && device.disableLegacy == "off" && device.localMigration)
        let notes = device.notes(msixVectors: 10)
        #expect(notes.count == 4, "\(notes)")
        #expect(notes.contains { $0.hasPrefix("disable-legacy=off has no effect: the device is modern-only") }, "\(notes)")
        #expect(notes.contains { $0.hasPrefix("bus=pci.1 names a pcie-pci-bridge alias") }, "\(notes)")
        // A device on the root bus with disable-legacy=on is exactly what this machine does.
        let plain = try DeviceSpec.parse("virtio-net-pci,netdev=n0,bus=pcie.0,disable-legacy=on", option: "-device")
        #expect(plain.notes(msixVectors: 3).isEmpty)
    }

    @Test(arguments: [
        (["-device", "virtio-net-pci,netdev=n0"], "netdev 'n0' not found"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,bus=pci.1"],
         "-device virtio-net-pci: Bus 'pci.1' not found (the root bus is pcie.0; -device pcie-pci-bridge,id=pci.1,bus=pcie.0 adds that name)"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,disable-legacy=maybe"], "disable-legacy=maybe must be on, off or auto"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,vectors=5000"], "vectors=5000 must be 0..2048"),
        (["-device", "pcie-pci-bridge,id=pci.1,bus=pci.7"], "bus=pci.7: the bridge alias sits on the root bus, use bus=pcie.0"),
        (["-device", "pcie-pci-bridge,bus=pcie.0"], "parameter 'id' is missing"),
        (["-machine", "pc"], "unsupported machine type 'pc' (this VMM provides one machine, 'microvm'; 'q35' is accepted as an alias of it)"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-net-pci,netdev=n0"], "already used"),
        (["-netdev", "tap,id=n0", "-netdev", "tap,id=n0"], "duplicate id 'n0'"),
        (["-netdev", "tap,id=n0", "-device", "e1000,netdev=n0"], "unsupported device 'e1000'"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=01:00:00:00:00:01"], "multicast"),
        (["-netdev", "tap,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=zz"], "not a MAC address"),
    ])
    func badDevicesAreRefused(arguments: [String], fragment: String) {
        do {
            _ = try VMMConfiguration.parse(["-kernel", "k"] + arguments)
            Issue.record("accepted \(arguments)")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
        }
    }
}

@Suite struct VirtioPCITransportTests {
    final class FakeModel: VirtioDeviceModel, @unchecked Sendable {
        var activated: UInt64?
        var notified: [Int] = []
        var resets = 0
        var deviceType: UInt16 { 1 }
        var pciClass: UInt32 { 0x020000 }
        var deviceFeatures: UInt64 { 1 << 5 }
        var queueMaxSizes: [UInt16] { [16, 16] }
        func readConfig(offset: Int, size: Int) -> UInt32 { offset == 0 ? 0xAB : 0 }
        func writeConfig(offset: Int, size: Int, value: UInt32) {}
        var held: [Int: Virtqueue] = [:]
        func activate(features: UInt64, queues: [Int: Virtqueue], context: DatapathContext) {
            activated = features
            held = queues
        }
        func deactivate() -> [Int: Virtqueue] { defer { held = [:] }; return held }
        func queueNotified(_ index: Int) { notified.append(index) }
        func reset() { resets += 1 }
    }

    func write(_ t: VirtioPCITransport, _ offset: UInt64, _ value: UInt64, size: Int) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { t.barWrite(0, offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
    }

    func read(_ t: VirtioPCITransport, _ offset: UInt64, size: Int) -> UInt64 {
        var v: UInt64 = 0
        withUnsafeMutableBytes(of: &v) { t.barRead(0, offset: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<size])) }
        return v
    }

    @Test func driverInitialisationSequence() throws {
        let memory = try GuestMemory(size: 2 << 20)
        let model = FakeModel()
        let t = VirtioPCITransport(name: "t", model: model, memory: memory, logger: .init(label: "test"))
        #expect(t.configSpace.read(offset: 0, size: 4) == 0x1041_1AF4)
        write(t, 0x14, 1 | 2, size: 1)
        write(t, 0x00, 1, size: 4)
        #expect(read(t, 0x04, size: 4) == 1)  // VERSION_1 is bit 32
        write(t, 0x00, 0, size: 4)
        #expect(read(t, 0x04, size: 4) == 1 << 5)
        write(t, 0x08, 0, size: 4); write(t, 0x0C, 1 << 5, size: 4)
        write(t, 0x08, 1, size: 4); write(t, 0x0C, 1, size: 4)
        write(t, 0x14, 1 | 2 | 8, size: 1)
        #expect(read(t, 0x14, size: 1) & 8 == 8)
        #expect(read(t, 0x12, size: 2) == 2)
        write(t, 0x16, 1, size: 2)
        write(t, 0x18, 8, size: 2)
        write(t, 0x20, 0x1000, size: 8); write(t, 0x28, 0x2000, size: 8); write(t, 0x30, 0x3000, size: 8)
        write(t, 0x1C, 1, size: 2)
        write(t, 0x14, 1 | 2 | 8 | 4, size: 1)
        #expect(model.activated == (1 << 32 | 1 << 5))
        write(t, 0x3000 + 4, 1, size: 2)
        #expect(model.notified == [1])
        #expect(read(t, 0x2000, size: 1) == 0xAB)
        // Layout is frozen once the queue is enabled.
        write(t, 0x20, 0x5000, size: 8)
        #expect(read(t, 0x20, size: 4) == 0x1000)
        write(t, 0x14, 0, size: 1)
        #expect(model.resets == 1 && read(t, 0x14, size: 1) == 0)
    }

    @Test func refusesFeaturesTheDeviceDidNotOffer() throws {
        let memory = try GuestMemory(size: 2 << 20)
        let t = VirtioPCITransport(name: "t", model: FakeModel(), memory: memory, logger: .init(label: "test"))
        write(t, 0x08, 0, size: 4); write(t, 0x0C, 1 << 7, size: 4)
        write(t, 0x08, 1, size: 4); write(t, 0x0C, 1, size: 4)
        write(t, 0x14, 1 | 2 | 8, size: 1)
        #expect(read(t, 0x14, size: 1) & 8 == 0)
    }

    @Test func badRingAddressesMarkTheDeviceNeedsReset() throws {
        let memory = try GuestMemory(size: 2 << 20)
        let model = FakeModel()
        let t = VirtioPCITransport(name: "t", model: model, memory: memory, logger: .init(label: "test"))
        write(t, 0x08, 1, size: 4); write(t, 0x0C, 1, size: 4)
        write(t, 0x14, 1 | 2 | 8, size: 1)
        write(t, 0x16, 0, size: 2)
        write(t, 0x20, 0x7FFF_0000, size: 8)
        write(t, 0x1C, 1, size: 2)
        write(t, 0x14, 1 | 2 | 8 | 4, size: 1)
        #expect(read(t, 0x14, size: 1) & 0x40 == 0x40)
        #expect(model.activated == nil)
    }
}
