import CLinux
import Glibc
import Logging
import QMPWire
import Testing
@testable import VMMCore

/// Migration pieces below the functional tests: URIs and channels, the VMM-side dirty
/// map, RAM records, shared-RAM sections and the checksum.
@Suite struct MigrationTransferTests {
    @Test(arguments: [
        ("unix:/tmp/m.sock", MigrationURI.unix(path: "/tmp/m.sock")),
        ("tcp:127.0.0.1:4444", .tcp(host: "127.0.0.1", port: 4444)),
        ("tcp:[::1]:4444", .tcp(host: "::1", port: 4444)),
        ("tcp:0:4444", .tcp(host: "0", port: 4444)),
        ("fd:3", .fd("3")),
        ("fd:migsock", .fd("migsock")),
    ])
    func urisParse(text: String, uri: MigrationURI) throws {
        #expect(try MigrationURI(text) == uri)
        #expect(uri.carriesFileDescriptors == text.hasPrefix("unix:"))
    }

    @Test(arguments: [
        ("exec:cat", "is not supported"), ("unix:", "no socket path"), ("tcp:host", "has no port"),
        ("tcp:host:0", "port '0'"), ("tcp:host:99999", "port '99999'"), ("fd:", "has no fd number or name"),
    ])
    func badURIsSayWhy(text: String, fragment: String) {
        #expect { try MigrationURI(text) } throws: { "\($0)".contains(fragment) }
    }

    @Test func channelsFormMatchesTheURIForm() throws {
        let unix: JSON = [["channel-type": "main", "addr": ["transport": "socket", "type": "unix", "path": "/tmp/m.sock"]]]
        #expect(try MigrationChannels(channels: unix) == MigrationChannels(main: .unix(path: "/tmp/m.sock")))
        let inet: JSON = [["channel-type": "main", "addr": ["transport": "socket", "type": "inet", "host": "10.0.0.1", "port": "7000"]]]
        #expect(try MigrationChannels(channels: inet).main == .tcp(host: "10.0.0.1", port: 7000))
        #expect(try MigrationChannels(arguments: ["uri": "unix:/a"]) == MigrationChannels(main: .unix(path: "/a")))
        let both: JSONObject = ["uri": "unix:/a", "channels": unix]
        #expect { try MigrationChannels(arguments: both) } throws: { "\($0)".contains("mutually exclusive") }
        #expect { try MigrationChannels(arguments: [:]) } throws: { "\($0)".contains("either 'uri' or 'channels'") }
    }

    @Test func channelsNameMainAndCPROnceEach() throws {
        let main: JSON = ["channel-type": "main", "addr": ["transport": "socket", "type": "unix", "path": "/tmp/m"]]
        let cpr: JSON = ["channel-type": "cpr", "addr": ["transport": "socket", "type": "unix", "path": "/tmp/c"]]
        #expect(try MigrationChannels(channels: [cpr, main]) == MigrationChannels(main: .unix(path: "/tmp/m"), cpr: .unix(path: "/tmp/c")))
        #expect(try MigrationChannels(channels: [cpr]) == MigrationChannels(cpr: .unix(path: "/tmp/c")))
        #expect { try MigrationChannels(channels: [main, main]) } throws: { "\($0)" == "the main channel is given twice" }
        #expect { try MigrationChannels(channels: []) } throws: { "\($0)".contains("non-empty list") }
        let other: JSON = ["channel-type": "return-path", "addr": ["transport": "socket", "type": "unix", "path": "/x"]]
        #expect { try MigrationChannels(channels: [other]) } throws: { "\($0)" == "channel-type 'return-path' is not supported (main or cpr)" }
        let fd: JSON = ["channel-type": "cpr", "addr": ["transport": "socket", "type": "fd", "str": "5"]]
        #expect(try MigrationChannels(channels: [fd]).cpr == .fd("5"))
        let fdWithoutStr: JSON = ["channel-type": "main", "addr": ["transport": "socket", "type": "fd"]]
        #expect { try MigrationChannels(channels: [fdWithoutStr]) } throws: { "\($0)" == "an fd channel needs 'str' (an fd number or getfd name)" }
        let noAddr: JSON = ["channel-type": "cpr"]
        #expect { try MigrationChannels(channels: [noAddr]) } throws: { "\($0)" == "the channel has no 'addr'" }
    }

    /// `-incoming` given twice: a URI or a JSON channel object each.
    @Test func incomingOptionsAddUpToTheChannels() throws {
        var channels = MigrationChannels()
        try channels.add(incoming: #"{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/tmp/c"}}"#)
        try channels.add(incoming: "unix:/tmp/m")
        #expect(channels == MigrationChannels(main: .unix(path: "/tmp/m"), cpr: .unix(path: "/tmp/c")))
        #expect { try channels.add(incoming: "unix:/tmp/n") } throws: { "\($0)" == "the main channel is given twice" }
        #expect { try channels.add(incoming: #"{"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": "/c2"}}"#) } throws: {
            "\($0)" == "the cpr channel is given twice"
        }
        var broken = MigrationChannels()
        #expect { try broken.add(incoming: #"{"channel-type": "main""#) } throws: { "\($0)".hasPrefix("not a JSON channel object: ") }
    }

    @Test func dirtyBitmapMarksEveryTouchedPageOnce() {
        let map = DirtyBitmap(bytes: 1 << 20)  // 256 pages, 4 words
        map.mark(offset: 4095, count: 2)         // straddles pages 0 and 1
        map.mark(offset: 63 * 4096, count: 4096 * 3)  // pages 63...65, across a word boundary
        map.mark(offset: 255 * 4096 + 100, count: 1 << 20)  // clipped at the end
        var words = [UInt64](repeating: 0, count: map.wordCount)
        map.take(into: &words)
        let pages = (0..<256).filter { words[$0 / 64] >> UInt64($0 % 64) & 1 == 1 }
        #expect(pages == [0, 1, 63, 64, 65, 255])
        var again = [UInt64](repeating: 0, count: map.wordCount)
        map.take(into: &again)
        #expect(again.allSatisfy { $0 == 0 }, "take clears the map")
    }

    @Test func deviceWritesToGuestRAMAreTracked() throws {
        let memory = try GuestMemory(size: 2 << 20, shared: true)
        try memory.store(UInt32(7), at: 0x1_0000)
        try memory.write([1, 2, 3], at: 0x2_0FFF)
        var words = [UInt64](repeating: 0, count: memory.deviceDirty.wordCount)
        memory.deviceDirty.take(into: &words)
        let pages = (0..<512).filter { words[$0 / 64] >> UInt64($0 % 64) & 1 == 1 }
        #expect(pages == [0x10, 0x20, 0x21])
    }

    /// A later pass must turn a page the source zeroed back to zero on the target.
    @Test func ramRecordsCarryDataAndZeroPages() throws {
        let memory = try GuestMemory(size: 1 << 20, shared: true)
        try memory.write([UInt8](repeating: 0xEE, count: 4096), at: 0x3000)
        var w = StreamWriter()
        w.u64(0x1000)
        w.raw([UInt8](repeating: 0x5A, count: 4096))
        w.u64(0x3000 | RAMTransfer.zeroPageFlag)
        try RAMTransfer.load(w.bytes, into: memory, progress: MigrationState())
        #expect(try memory.read(at: 0x1000, count: 4096).allSatisfy { $0 == 0x5A })
        #expect(try memory.read(at: 0x3000, count: 4096).allSatisfy { $0 == 0 })

        var outside = StreamWriter()
        outside.u64(2 << 20)
        outside.raw([UInt8](repeating: 1, count: 4096))
        #expect { try RAMTransfer.load(outside.bytes, into: memory, progress: MigrationState()) } throws: {
            "\($0)".contains("outside this machine's RAM")
        }
        var truncated = StreamWriter()
        truncated.u64(0x1000)
        truncated.raw([UInt8](repeating: 1, count: 100))
        #expect(throws: StreamError.self) { try RAMTransfer.load(truncated.bytes, into: memory, progress: MigrationState()) }
    }

    static func received(ramFD: FileDescriptor) throws -> ReceivedFDs {
        let table = ReceivedFDs()
        table.append([ramFD])
        try table.bind([SharedRAM.memfdName], for: "shared RAM")
        return table
    }

    @Test func sharedRAMSectionsRoundTripAndAdoptTheMemfd() throws {
        let file = SharedRAM.file(path: "/dev/shm/x", device: 1, inode: 2, size: 1 << 20)
        #expect(try SharedRAM.decode(file.encode()) == file)
        #expect(try SharedRAM.decode(SharedRAM.memfd(size: 4096).encode()) == .memfd(size: 4096))

        // The source writes through its mapping; after adopting its memfd the target sees it.
        let source = try GuestMemory(size: 1 << 20, shared: true)
        try source.store(UInt64(0xFEED), at: 0x8000)
        let target = try GuestMemory(size: 1 << 20, shared: false)
        try SharedRAM.memfd(size: 1 << 20).adopt(into: target, fds: try Self.received(ramFD: source.fd.duplicate()))
        #expect(try target.load(UInt64.self, at: 0x8000) == 0xFEED)
        try target.store(UInt64(1), at: 0x9000)
        #expect(try source.load(UInt64.self, at: 0x9000) == 1)

        let small = try GuestMemory(size: 2 << 20)
        #expect { try SharedRAM.memfd(size: 1 << 20).adopt(into: small, fds: try Self.received(ramFD: source.fd.duplicate())) } throws: {
            "\($0)".contains("1048576 bytes, this machine's 2097152")
        }
        // A file the target does not map is refused, never a silently zeroed guest.
        #expect { try file.adopt(into: target, fds: ReceivedFDs()) } throws: { "\($0)".contains("the target must map the same file") }
    }

    @Test func sharedRAMExtentsSkipHoles() throws {
        let memory = try GuestMemory(size: 4 << 20, shared: true)
        #expect(memory.dataExtents(in: 0..<(4 << 20)) == [])
        try memory.store(UInt8(1), at: 0x20_0010)
        let extents = try #require(memory.dataExtents(in: 0..<(4 << 20)))
        #expect(extents.count == 1)
        #expect(extents.allSatisfy { $0.contains(0x20_0010) && $0.lowerBound % 4096 == 0 })
        #expect(try GuestMemory(size: 1 << 20, shared: false).dataExtents(in: 0..<(1 << 20)) == nil)
    }

    /// A cpr-transfer target's control thread reads the queued main stream only as far as
    /// whole sections arrived: a section cut short must read as not queued (else that
    /// thread would block in the read, away from its signalfd).
    @Test func aSectionCountsAsQueuedOnlyWhenItsLastByteArrived() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let sending = MigrationChannel(socket: FileDescriptor(adopting: pair[0], label: "sending end"))
        let receiving = MigrationChannel(socket: FileDescriptor(adopting: pair[1], label: "receiving end"))
        #expect(!receiving.hasQueued(MigrationStream.headerSize))
        try sending.send(MigrationStream.header())
        #expect(receiving.hasQueued(MigrationStream.headerSize))
        _ = try receiving.receive(MigrationStream.headerSize, what: "header")
        let frame = MigrationStream.encode(.init(kind: .device, name: "net0", payload: [UInt8](repeating: 7, count: 100)))
        for cut in [2, 4, frame.count - 1] {
            try sending.send(Array(frame[..<cut]))
            #expect(!receiving.nextSectionQueued(), "\(cut) of \(frame.count) bytes")
            try sending.send(Array(frame[cut...]))
            #expect(receiving.nextSectionQueued())
            #expect(try receiving.receiveSection().name == "net0")
        }
        #expect(!receiving.nextSectionQueued())
        // A corrupt length is "queued": reading it fails at once, without waiting.
        try sending.send([0xFF, 0xFF, 0xFF, 0xFF])
        #expect(receiving.nextSectionQueued())
        #expect(throws: StreamError.self) { try receiving.receiveSection() }
    }

    @Test func crc32cMatchesTheKnownCheckValue() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8]()) == 0)
    }
}

/// RAM passes end to end over a socket pair: what the source's pass sends, the target's
/// loader turns into the same bytes.
@Suite struct RAMPassTests {
    /// Runs `pass` on a thread with the sending end; loads every RAM section on this one.
    static func transfer(from source: GuestMemory, into target: GuestMemory,
                         _ pass: @escaping @Sendable (RAMTransfer) throws -> Void) throws -> MigrationState {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0)
        let sending = MigrationChannel(socket: FileDescriptor(adopting: pair[0], label: "sending end"))
        let receiving = MigrationChannel(socket: FileDescriptor(adopting: pair[1], label: "receiving end"))
        let progress = MigrationState()
        let transfer = RAMTransfer(memory: source, channel: sending, progress: progress, maxBandwidth: 0,
                                   logger: Logger(label: "test"))
        let thread = try OSThread(name: "ram-pass") {
            try? pass(transfer)
            try? sending.send(.init(kind: .end))
        }
        while true {
            let section = try receiving.receiveSection()
            if section.kind == .end { break }
            try RAMTransfer.load(section.payload, into: target, progress: MigrationState())
        }
        thread.join()
        return progress
    }

    static func fill(_ memory: GuestMemory, page: Int, with byte: UInt8) throws {
        try memory.write([UInt8](repeating: byte, count: 4096), at: UInt64(page * 4096))
    }

    @Test func firstPassCopiesEveryNonZeroPageAndReadsOnlyData() throws {
        let source = try GuestMemory(size: 4 << 20, shared: true)
        for (page, byte) in [(0, 1), (1, 2), (63, 3), (64, 4), (700, 5), (1023, 6)] { try Self.fill(source, page: page, with: UInt8(byte)) }
        let target = try GuestMemory(size: 4 << 20, shared: true)
        let progress = try Self.transfer(from: source, into: target) { _ = try $0.sendPass(bitmap: nil, live: true) }
        #expect(try target.read(at: 0, count: 4 << 20) == source.read(at: 0, count: 4 << 20))
        #expect(progress.pagesTransferred.load(ordering: .relaxed) == 6)
        // Holes were skipped without a look: 1024 pages, 6 with data.
        #expect(progress.zeroPages.load(ordering: .relaxed) + 6 == 1024)
    }

    /// A later pass sends exactly the marked pages, a page that became zero included, and
    /// leaves the rest of the target alone.
    @Test func dirtyPassSendsMarkedPagesAcrossWordBoundaries() throws {
        let source = try GuestMemory(size: 1 << 20, shared: true)
        let target = try GuestMemory(size: 1 << 20, shared: true)
        for page in 0..<256 { try Self.fill(target, page: page, with: 0xEE) }
        for page in [0, 63, 64, 127, 128, 200] { try Self.fill(source, page: page, with: UInt8(page)) }
        // Page 5 is zero on the source but stale on the target: marked, it must be zeroed.
        var bitmap = [UInt64](repeating: 0, count: 4)
        for page in [0, 5, 63, 64, 127, 128, 200] { bitmap[page / 64] |= 1 << UInt64(page % 64) }
        let marked = bitmap
        let progress = try Self.transfer(from: source, into: target) { _ = try $0.sendPass(bitmap: marked, live: false) }
        for page in 0..<256 {
            let expected: UInt8 = [0, 63, 64, 127, 128, 200].contains(page) ? UInt8(page) : (page == 5 ? 0 : 0xEE)
            #expect(try target.read(at: UInt64(page * 4096), count: 4096).allSatisfy { $0 == expected }, "page \(page)")
        }
        #expect(progress.pagesTransferred.load(ordering: .relaxed) == 5)  // page 0 is zero-filled with byte 0
        #expect(progress.zeroPages.load(ordering: .relaxed) == 2)
    }
}
