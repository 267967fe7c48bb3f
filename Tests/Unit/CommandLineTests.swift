import Testing
@testable import VMMCore

@Suite struct CommandLineTests {
    @Test func keyValueListHandlesImpliedKeyEscapesAndBooleans() throws {
        let list = try KeyValueList("tap,id=n0,,x,script=no,server,nowait", option: "-netdev", impliedKey: "type")
        #expect(list["type"] == "tap")
        #expect(list["id"] == "n0,x")
        #expect(list["server"] == "on")
        #expect(list["wait"] == "off")
    }

    @Test(arguments: [("128", UInt64(128) << 20), ("1G", 1 << 30), ("512k", 512 << 10), ("64M", 64 << 20)])
    func memorySizes(text: String, bytes: UInt64) throws {
        let config = try VMMConfiguration.parse(["-m", text, "-kernel", "k"])
        #expect(try config.resolvedMemory().size == bytes)
    }

    @Test func fullQEMUStyleCommandLine() throws {
        let config = try VMMConfiguration.parse([
            "-name", "guest1", "-nodefaults", "-no-user-config", "-display", "none", "-accel", "kvm", "-S",
            "-object", "memory-backend-memfd,id=ram0,size=256M,share=on", "-machine", "microvm,memory-backend=ram0",
            "-m", "256M", "-kernel", "/k.elf", "-append", "console=ttyS0",
            "-serial", "unix:/tmp/c.sock,server=on,wait=off", "-qmp", "unix:/tmp/q.sock,server=on,wait=off",
        ])
        #expect(config.name == "guest1")
        #expect(config.haltPollNanoseconds == VCPURunner.defaultHaltPollNanoseconds)
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-incoming", "defer"]).incoming == MigrationChannels())
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-incoming", "unix:/tmp/m.sock"]).incoming == MigrationChannels(main: .unix(path: "/tmp/m.sock")))
        // QEMU's channel syntax, twice: the series author's target (main deferred, cpr given).
        let cpr = #"{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/c.sock"}}"#
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-incoming", "defer", "-incoming", cpr]).incoming
                == MigrationChannels(cpr: .unix(path: "/tmp/c.sock")))
        let main = #"{"channel-type": "main", "addr": {"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"}}"#
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-incoming", main, "-incoming", cpr]).incoming
                == MigrationChannels(main: .tcp(host: "127.0.0.1", port: 4444), cpr: .unix(path: "/tmp/c.sock")))
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-global", "migration.x-events=on"]).migrationEvents)
        #expect(try !VMMConfiguration.parse(["-kernel", "k"]).migrationEvents)
        #expect(try VMMConfiguration.parse(["-kernel", "k", "-accel", "kvm,x-halt-poll-ns=5000000"]).haltPollNanoseconds == 5_000_000)
        #expect(config.startPaused)
        #expect(config.kernel == "/k.elf")
        #expect(config.serial == [.unixServer(path: "/tmp/c.sock", wait: false)])
        #expect(config.qmp == [.unixServer(path: "/tmp/q.sock", wait: false)])
        let ram = try config.resolvedMemory()
        #expect(ram.size == 256 << 20 && ram.backing == .memfd && ram.shared)
    }

    @Test func defaultsFollowQEMU() throws {
        let plain = try VMMConfiguration.parse(["-kernel", "k"])
        #expect(plain.serial == [.stdio])
        #expect(try plain.resolvedMemory().size == 128 << 20)
        #expect(try plain.resolvedMemory().shared == true)  // like memory-backend-memfd
        let noDefaults = try VMMConfiguration.parse(["-kernel", "k", "-nodefaults"])
        #expect(noDefaults.serial.isEmpty)
        let client = try VMMConfiguration.parse(["-kernel", "k", "-serial", "unix:/s", "-qmp", "unix:/q"])
        #expect(client.serial == [.unixClient(path: "/s")] && client.qmp == [.unixClient(path: "/q")])
        let file = try VMMConfiguration.parse(["-kernel", "k", "-object", "memory-backend-file,id=m,size=1G,mem-path=/dev/shm/x,share=on", "-machine", "memory-backend=m"])
        #expect(try file.resolvedMemory().backing == .file(path: "/dev/shm/x"))
    }

    @Test(arguments: [
        (["-foo"], "-foo: invalid option"),
        (["-kernel"], "-kernel: requires an argument"),
        (["-m", "12x", "-kernel", "k"], "'12x'"),
        (["stray", "-kernel", "k"], "unexpected argument 'stray'"),
        (["-m", "128M"], "-kernel: a guest kernel is required"),
        (["-kernel", "k", "-serial", "tcp:1.2.3.4:5"], "unsupported backend"),
        (["-kernel", "k", "-qmp", "stdio"], "unix sockets only"),
        (["-kernel", "k", "-machine", "pc"], "unsupported machine type 'pc'"),
        (["-kernel", "k", "-machine", "memory-backend=nope"], "no -object with id 'nope'"),
        (["-kernel", "k", "-object", "memory-backend-memfd,id=a,size=1G", "-machine", "memory-backend=a", "-m", "2G"], "must equal -m"),
        (["-kernel", "k", "-object", "memory-backend-memfd,id=a,size=1G,colour=red"], "unknown parameter 'colour'"),
        (["-kernel", "k", "-object", "memory-backend-file,id=a,size=1G"], "'mem-path' is missing"),
        (["-kernel", "k", "-object", "memory-backend-memfd,id=a,size=1G,share=maybe"], "expects 'on' or 'off'"),
        (["-kernel", "k", "-accel", "tcg"], "only the kvm accelerator"),
        (["-kernel", "k", "-smp", "4"], "only one vCPU"),
        (["-kernel", "k", "-accel", "kvm,x-halt-poll-ns=-1"], "must be 0..10000000"),
        (["-kernel", "k", "-accel", "kvm,colour=red"], "unknown parameter 'colour'"),
        (["-kernel", "k", "-incoming", "rdma:1.2.3.4:5"], "-incoming rdma:1.2.3.4:5: migration URI 'rdma:1.2.3.4:5' is not supported"),
        (["-kernel", "k", "-incoming", "tcp:1.2.3.4"], "has no port"),
        (["-kernel", "k", "-incoming", "unix:/a", "-incoming", "unix:/b"], "-incoming unix:/b: the main channel is given twice"),
        (["-kernel", "k", "-incoming", #"{"channel-type": "cpr", "addr": {"transport": "rdma"}}"#], "channel transport 'rdma' is not supported (only 'socket')"),
        (["-kernel", "k", "-global", "virtio-net-pci.mq=on"], "-global virtio-net-pci.mq=on: only migration.x-events=on|off is supported"),
        (["-kernel", "k", "-global", "migration.x-events=yes"], "migration.x-events takes on or off, not 'yes'"),
    ])
    func badCommandLinesNameTheOption(arguments: [String], fragment: String) {
        do {
            _ = try VMMConfiguration.parse(arguments)
            Issue.record("accepted \(arguments)")
        } catch {
            #expect("\(error)".contains(fragment), "\(error)")
            #expect(!"\(error)".contains("\n"))
        }
    }
}
