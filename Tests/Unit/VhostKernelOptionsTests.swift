import Glibc
import Testing
@testable import VMMCore

/// `-netdev tap,...,vhost=on[,vhostforce=on][,vhostfd=N|vhostfds=N:M]` (also netdev_add's
/// keys, which go through the same parser).
@Suite struct VhostKernelOptionsTests {
    @Test func vhostOnOpensItsOwnDevices() throws {
        let spec = try NetdevSpec.parse("tap,id=n1,ifname=tap0,queues=2,vhost=on,script=no,downscript=no", option: "-netdev")
        #expect(spec.vhost == VhostKernelOptions(fds: nil, origin: "-netdev tap,id=n1,ifname=tap0,queues=2,vhost=on,script=no,downscript=no"))
        #expect(spec.queues == 2)
    }

    /// QEMU's rule: without `vhost=`, vhostforce=on or vhostfd(s) turn vhost on; `vhost=`
    /// decides when given.
    @Test func whatTurnsVhostOn() throws {
        let fd = open("/dev/null", O_RDONLY)
        defer { close(fd) }
        #expect(try NetdevSpec.parse("tap,id=n1,vhostforce=on", option: "-netdev").vhost != nil)
        #expect(try NetdevSpec.parse("tap,id=n1,vhost=on,vhostforce=on", option: "-netdev").vhost != nil)
        #expect(try NetdevSpec.parse("tap,id=n1,vhost=off,vhostforce=on", option: "-netdev").vhost == nil)
        #expect(try NetdevSpec.parse("tap,id=n1,vhost=off", option: "-netdev").vhost == nil)
        #expect(try NetdevSpec.parse("tap,id=n1", option: "-netdev").vhost == nil)
        #expect(try NetdevSpec.parse("tap,id=n1,vhostfd=\(fd)", option: "-netdev").vhost?.fds == [fd])
        #expect(try NetdevSpec.parse("tap,id=n1,fds=\(fd):\(fd),vhostfds=\(fd):\(fd)", option: "-netdev").vhost?.fds == [fd, fd])
        // The series allows vhost beside incoming-fds: the target opens its own devices.
        let incoming = try NetdevSpec.parse("tap,id=n1,incoming-fds=on,queues=2,vhost=on,script=no,downscript=no", option: "-netdev")
        #expect(incoming.incomingFDs && incoming.vhost?.fds == nil)
    }

    @Test func vhostFDCountMustMatchTheQueues() {
        let fd = open("/dev/null", O_RDONLY)
        defer { close(fd) }
        let cases: [(String, String)] = [
            ("tap,id=n1,queues=4,vhostfds=\(fd):\(fd)",
             "-netdev tap,id=n1,queues=4,vhostfds=\(fd):\(fd): vhostfds=\(fd):\(fd) gives 2 vhost-net fds for netdev 'n1', which has 4 queues (one per queue)"),
            ("tap,id=n1,fds=\(fd):\(fd),vhostfd=\(fd)",
             "-netdev tap,id=n1,fds=\(fd):\(fd),vhostfd=\(fd): vhostfd=\(fd) gives 1 vhost-net fd for netdev 'n1', which has 2 queues (one per queue)"),
            ("tap,id=n1,vhostfds=\(fd):\(fd)",
             "-netdev tap,id=n1,vhostfds=\(fd):\(fd): vhostfds=\(fd):\(fd) gives 2 vhost-net fds for netdev 'n1', which has 1 queue (one per queue)"),
            ("tap,id=n1,vhostfd=\(fd),vhostfds=\(fd)", "-netdev tap,id=n1,vhostfd=\(fd),vhostfds=\(fd): vhostfd= and vhostfds= exclude each other"),
            ("tap,id=n1,vhost=off,vhostfd=\(fd)", "-netdev tap,id=n1,vhost=off,vhostfd=\(fd): vhostfd= needs vhost=on, but vhost=off was given"),
            ("tap,id=n1,vhostfd=999", "-netdev tap,id=n1,vhostfd=999: fd 999 is not open in this process"),
            ("tap,id=n1,vhostfds=x", "-netdev tap,id=n1,vhostfds=x: 'x' is not a file descriptor number"),
            ("tap,id=n1,vhost=maybe", "vhost"),
        ]
        for (text, message) in cases {
            #expect {
                _ = try NetdevSpec.parse(text, option: "-netdev")
            } throws: { error in
                message == "vhost" ? "\(error)".contains("vhost") : "\(error)" == message
            }
        }
    }
}
