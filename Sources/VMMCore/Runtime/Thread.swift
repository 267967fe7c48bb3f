import CLinux
import Glibc

/// A dedicated OS thread for blocking work (KVM_RUN, poll), kept off Swift's cooperative pool.
public final class OSThread: @unchecked Sendable {
    public private(set) var handle: pthread_t = 0

    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    public init(name: String, _ body: @escaping @Sendable () -> Void) throws {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { arg in
            let box = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SystemError("pthread_create \(name)", errno: rc)
        }
        handle = thread
        _ = cl_set_thread_name(thread, String(name.prefix(15)))
    }

    public func join() { pthread_join(handle, nil) }

    public func signal(_ sig: Int32) { pthread_kill(handle, sig) }
}
