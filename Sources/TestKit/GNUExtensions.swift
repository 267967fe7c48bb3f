import Glibc

/// glibc functions that Swift's Glibc module hides behind _GNU_SOURCE, looked up at run
/// time. nil when this libc lacks them; callers fall back to something weaker.
enum GNUExtensions {
    private static func symbol(_ name: String) -> UnsafeMutableRawPointer? {
        // RTLD_DEFAULT is ((void *)0) in glibc: search every loaded object.
        dlsym(nil, name)
    }

    typealias Accept4 = @convention(c) (Int32, UnsafeMutablePointer<sockaddr>?, UnsafeMutablePointer<socklen_t>?, Int32) -> Int32
    static let accept4: Accept4? = symbol("accept4").map { unsafeBitCast($0, to: Accept4.self) }

    typealias SetThreadName = @convention(c) (pthread_t, UnsafePointer<CChar>) -> Int32
    static let setThreadName: SetThreadName? = symbol("pthread_setname_np").map { unsafeBitCast($0, to: SetThreadName.self) }

    typealias EventFD = @convention(c) (UInt32, Int32) -> Int32
    /// In <sys/eventfd.h>, which only CLinux brings, and CLinux cannot be imported next to CCap.
    static let eventfd: EventFD? = symbol("eventfd").map { unsafeBitCast($0, to: EventFD.self) }
    static let eventfdCloseOnExec: Int32 = O_CLOEXEC  // EFD_CLOEXEC is defined as O_CLOEXEC

    typealias AddCloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
    /// glibc 2.34+: closes every fd >= n in the child between fork and exec.
    static let addCloseFrom: AddCloseFrom? = symbol("posix_spawn_file_actions_addclosefrom_np")
        .map { unsafeBitCast($0, to: AddCloseFrom.self) }
}

/// accept with the new fd close-on-exec from the start; without accept4 there is a short
/// window where a concurrent spawn could inherit it, which closefrom in our own spawns covers.
func acceptCloseOnExec(_ fd: Int32) -> Int32 {
    if let accept4 = GNUExtensions.accept4 {
        return accept4(fd, nil, nil, Int32(SOCK_CLOEXEC.rawValue))
    }
    let client = accept(fd, nil, nil)
    if client >= 0 { _ = fcntl(client, F_SETFD, FD_CLOEXEC) }
    return client
}
