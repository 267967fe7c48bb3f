import CLinux
import Foundation
import Synchronization
import Testing

public enum NamespaceError: Error, CustomStringConvertible {
    case deleted(String)
    case nsenterMissing(searched: [String])

    public var description: String {
        switch self {
        case .deleted(let name): return "network namespace \(name) was already deleted"
        case .nsenterMissing(let searched):
            return "nsenter (util-linux) not found (searched: \(searched.joined(separator: ", "))); it launches VMMs inside a namespace"
        }
    }
}

/// A network namespace of its own for one test, pinned at /run/netns/NAME exactly as
/// `ip netns add NAME` does, so that `ip netns exec NAME ...` works on it while a test
/// runs (handy when debugging a hung test).
///
/// No thread lives in the namespace between calls: `run` starts a thread that `setns`es
/// into it, runs the body and ends, so a thread that entered a namespace is never
/// reused for anything else, and nothing needs stopping at `delete()`. Sockets created
/// inside `run` (netlink, ICMP) stay in the namespace for their lifetime and can be used
/// from any thread afterwards; they also keep the namespace alive until closed.
public final class NetworkNamespace: Sendable, CustomStringConvertible {
    public static let runDirectory = "/run/netns"

    /// `PREFIX-PID-N`, unique among parallel tests and test processes.
    public let name: String
    /// `readlink /proc/PID/ns/net` of a process inside shows `net:[inode]`.
    public let inode: UInt64
    public var path: String { Self.runDirectory + "/" + name }
    public var description: String { "netns \(name)" }

    private let deleted = Mutex(false)
    private static let counter = Atomic<Int>(0)
    /// Serializes making /run/netns a shared mount point; two threads doing it at once would stack two bind mounts.
    private static let runDirectoryLock = Mutex(())

    private init(name: String, inode: UInt64) {
        self.name = name
        self.inode = inode
    }

    // MARK: Lifetime

    /// Creates the namespace with `lo` up. `prefix` (default: the running test's name) is
    /// sanitized like artifact directory names, so `ip netns list` shows which test made it.
    public static func create(prefix: String? = nil) async throws -> NetworkNamespace {
        let prefix = ArtifactDirectory.sanitize(prefix ?? Test.current.map { "tk-\($0.name)" } ?? "testkit")
        let (name, inode) = try await BlockingThread.run(name: "tk-netns") { try createOnThisThread(prefix: prefix) }
        return NetworkNamespace(name: name, inode: inode)
    }

    /// The namespace of the innermost `NetworkNamespace.with` around the current task.
    /// `Machine.launch` refuses a machine outside it unless asked (see
    /// `MachineOptions.outsideNamespaceScope`): such a VMM would create its TAPs on the
    /// host, and the test would only see "100% lost".
    @TaskLocal public static var scope: NetworkNamespace?

    /// Runs `body` with a fresh namespace and deletes it afterwards, also when `body` throws
    /// (then `body`'s error is what propagates, not a failed delete). Machines launched
    /// in the namespace must be shut down inside `body`: a live process keeps it alive.
    public static func with<T>(
        prefix: String? = nil,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (NetworkNamespace) async throws -> T
    ) async throws -> T {
        let namespace = try await create(prefix: prefix)
        let result: T
        do {
            result = try await $scope.withValue(namespace) { try await body(namespace) }
        } catch {
            try? namespace.delete()
            throw error
        }
        try namespace.delete()
        return result
    }

    /// Unmounts and removes /run/netns/NAME. The kernel frees the namespace, and the
    /// TAPs and addresses in it, once nothing else holds it: no process or thread inside,
    /// no open socket created in it. Idempotent.
    public func delete() throws(SystemError) {
        try deleted.withLock { (deleted: inout Bool) throws(SystemError) in
            guard !deleted else { return }
            // MNT_DETACH, like `ip netns delete`: a lazy unmount cannot fail with EBUSY.
            // EINVAL: not mounted (creation failed half-way, or someone ran `ip netns delete`).
            if cl_umount_detach(path) != 0, errno != EINVAL, errno != ENOENT {
                throw SystemError("umount \(path)")
            }
            if unlink(path) != 0, errno != ENOENT { throw SystemError("unlink \(path)") }
            deleted = true
        }
    }

    public var isDeleted: Bool { deleted.withLock { $0 } }

    deinit {
        if !isDeleted {
            FileHandle.standardError.write(Data("TestKit: \(description) dropped without delete(); deleting it\n".utf8))
            try? delete()
        }
    }

    // MARK: Running code inside

    /// Runs `body` on a new thread that has entered the namespace. Anything `body`
    /// creates that is bound to a namespace (sockets, TAPs, links) is created in this one.
    public func run<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        let path = try livePath()
        return try await BlockingThread.run(name: "tk-netns") {
            try Self.enter(path)
            return try body()
        }
    }

    /// `run` for synchronous callers (a throwing init): blocks the caller until the thread
    /// is done, so only for quick work such as creating a socket.
    func perform<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let path = try livePath()
        let outcome = Mutex<Result<T, any Error>?>(nil)
        let thread = try BlockingThread(name: "tk-netns") {
            let result = Result { () throws -> T in
                try Self.enter(path)
                return try body()
            }
            outcome.withLock { $0 = result }
        }
        thread.join()
        return try outcome.withLock { $0! }.get()
    }

    /// argv to put in front of a command so that it runs inside: `nsenter --net=PATH --`.
    /// nsenter execs the command after `setns`, so the spawned pid is the command's pid
    /// (it forks only when entering a pid namespace, which this never asks for).
    public func commandPrefix() throws -> [String] {
        let path = try livePath()
        // The usual directories too: sudo's and CI's PATHs differ.
        var searchEnvironment = ProcessInfo.processInfo.environment
        searchEnvironment["PATH"] = (searchEnvironment["PATH"].map { $0 + ":" } ?? "") + "/usr/bin:/bin:/usr/sbin:/sbin"
        guard let nsenter = VMMBinary.findExecutable("nsenter", environment: searchEnvironment) else {
            throw NamespaceError.nsenterMissing(searched: VMMBinary.searchPath(searchEnvironment))
        }
        return [nsenter, "--net=\(path)", "--"]
    }

    private func livePath() throws(NamespaceError) -> String {
        guard !isDeleted else { throw NamespaceError.deleted(name) }
        return path
    }

    // MARK: Helpers

    /// Moves the calling thread into the namespace at `path`. Only on a thread that ends
    /// afterwards: Swift's pool threads must stay in the process's own namespace.
    static func enter(_ path: String) throws(SystemError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError("open \(path)") }
        defer { closeDescriptor(fd) }
        guard cl_setns(fd, CL_CLONE_NEWNET) == 0 else { throw SystemError("setns \(path)") }
    }

    /// Does what `ip netns add` does, on the calling thread, which ends up inside the new
    /// namespace and must therefore be a thread that ends afterwards.
    private static func createOnThisThread(prefix: String) throws -> (String, UInt64) {
        try prepareRunDirectory()
        // The mount point: an empty file, created exclusively so that a leftover of an
        // earlier process with the same pid is skipped instead of reused.
        var name = ""
        while true {
            let n = counter.wrappingAdd(1, ordering: .relaxed).newValue
            name = "\(prefix)-\(getpid())-\(n)"
            let fd = open(runDirectory + "/" + name, O_RDONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0)
            if fd >= 0 {
                closeDescriptor(fd)
                break
            }
            guard errno == EEXIST else { throw SystemError("create \(runDirectory)/\(name)") }
        }
        let path = runDirectory + "/" + name
        func undo() {
            _ = cl_umount_detach(path)
            unlink(path)
        }
        // CLONE_NEWNET alone may be unshared by one thread of a multi-threaded process;
        // only this thread moves.
        guard cl_unshare(CL_CLONE_NEWNET) == 0 else {
            let error = SystemError("unshare(CLONE_NEWNET)")
            undo()
            throw error
        }
        let source = "/proc/self/task/\(cl_gettid())/ns/net"
        guard cl_mount_bind(source, path) == 0 else {
            let error = SystemError("mount --bind \(source) \(path)")
            undo()
            throw error
        }
        do {
            // A fresh namespace has `lo` down: nothing, not even 127.0.0.1, would answer.
            let route = try RouteSocket()
            defer { route.close() }
            try route.setLink("lo", up: true)
        } catch {
            undo()
            throw error
        }
        var info = stat()
        guard stat(path, &info) == 0 else {
            let error = SystemError("stat \(path)")
            undo()
            throw error
        }
        return (name, UInt64(info.st_ino))
    }

    /// `mkdir -p /run/netns` and make it a shared mount point, as iproute2 does, so that
    /// an unmount in one mount namespace reaches copies in others and frees the namespace.
    private static func prepareRunDirectory() throws(SystemError) {
        try runDirectoryLock.withLock { (_: inout ()) throws(SystemError) in
            if mkdir(runDirectory, 0o755) != 0, errno != EEXIST { throw SystemError("mkdir \(runDirectory)") }
            var madeMountPoint = false
            while cl_mount_make_shared(runDirectory) != 0 {
                guard errno == EINVAL, !madeMountPoint else { throw SystemError("mount --make-rshared \(runDirectory)") }
                // EINVAL: not a mount point yet; bind it onto itself to make it one.
                guard cl_mount_bind_recursive(runDirectory, runDirectory) == 0 else {
                    throw SystemError("mount --rbind \(runDirectory) \(runDirectory)")
                }
                madeMountPoint = true
            }
        }
    }
}
