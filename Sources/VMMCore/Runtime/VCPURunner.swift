import CLinux
import Glibc
import Logging
import Synchronization

/// Runs one vCPU on its own thread and lets the control thread park and resume it.
/// Parking is synchronous: `pause()` returns once the vCPU is out of KVM_RUN, so a
/// `stop` reply means the guest really stopped (as QEMU's does).
public final class VCPURunner: @unchecked Sendable {
    /// Signal that knocks the vCPU thread out of KVM_RUN (handler installed by `Machine`).
    public static let kickSignal = SIGUSR1
    /// How long a halted vCPU sleeps when nothing wakes it: the guest's idle timer.
    public static let idleTimeoutMilliseconds: Int32 = 10

    /// An fd a halted vCPU also waits on, and what to do when it is ready. Handling
    /// device input right on the vCPU thread (receiving a frame into the guest's ring)
    /// saves the hop through the event loop thread before the guest runs again.
    public struct HaltWakeSource: Sendable {
        /// Held here for as long as the vCPU may poll it.
        public let fd: FileDescriptor
        public let wanted: @Sendable () -> Bool
        public let ready: @Sendable () -> Void

        public init(fd: FileDescriptor, wanted: @escaping @Sendable () -> Bool, ready: @escaping @Sendable () -> Void) {
            self.fd = fd
            self.wanted = wanted
            self.ready = ready
        }
    }

    struct Control {
        var wantRunning = false
        var parked = true
        var quit = false
    }

    let vcpu: VCPU
    private let bus: IOBus
    private let pci: PCIBus?
    private let logger: Logger
    private let control = ConditionLock(Control())
    private let stopRequested = Atomic<Bool>(true)
    private let halted = EventFD.orFatal()
    /// By owner, so a device that restarts replaces its sources instead of adding more.
    private let haltSources = Mutex<[String: [HaltWakeSource]]>([:])
    private var thread: OSThread?
    private let threadID = Atomic<Int32>(0)
    /// Called on the vCPU thread when the guest cannot go on (triple fault, KVM error).
    private let onFatal: @Sendable (String) -> Void

    public let exitCount = Atomic<UInt64>(0)
    public let haltCount = Atomic<UInt64>(0)

    public init(vcpu: VCPU, bus: IOBus, pci: PCIBus?, haltPollNanoseconds: Int64 = defaultHaltPollNanoseconds,
                logger: Logger, onFatal: @escaping @Sendable (String) -> Void) {
        self.haltPollNanoseconds = haltPollNanoseconds
        self.vcpu = vcpu
        self.bus = bus
        self.pci = pci
        self.logger = logger
        self.onFatal = onFatal
    }

    public var hostThreadID: Int32 { threadID.load(ordering: .relaxed) }

    public func start() throws {
        thread = try OSThread(name: "vcpu\(vcpu.id)") { [self] in threadMain() }
    }

    /// Lets the vCPU run (from the parked state).
    public func resume() {
        control.update { c in
            c.wantRunning = true
            stopRequested.store(false, ordering: .sequentiallyConsistent)
        }
    }

    /// Stops the vCPU and waits until it is parked outside KVM_RUN.
    public func pause() {
        requestStop()
        control.wait(until: { $0.parked || $0.quit }) { _ in }
    }

    /// Asks the vCPU to park without waiting; safe from the vCPU thread itself (a device
    /// handler that ends the guest's run, like debug-exit).
    public func requestStop() {
        control.update { $0.wantRunning = false }
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        vcpu.setImmediateExit(true)
        if let thread, pthread_equal(thread.handle, pthread_self()) == 0 { thread.signal(Self.kickSignal) }
        halted.signal()
    }

    /// Wakes a vCPU sleeping in HLT so the guest polls its devices again.
    public func wake() { halted.signal() }

    /// `owner`'s sources from now on (none: `[]`).
    public func setHaltWakeSources(owner: String, _ sources: [HaltWakeSource]) {
        haltSources.withLock { $0[owner] = sources.isEmpty ? nil : sources }
    }

    /// How long a halted vCPU with wake sources polls them before it sleeps
    /// (`-accel kvm,x-halt-poll-ns=N`). Packets often come back to back; catching the
    /// next one without a sleep and wake-up of this thread (slow under nested
    /// virtualization) keeps latency down. Like KVM's halt_poll_ns, it trades host CPU
    /// after each halt for that: up to 10 ms polls all the time, as a spinning guest would.
    public static let defaultHaltPollNanoseconds: Int64 = 100_000
    let haltPollNanoseconds: Int64

    /// Sleeps until kicked, a wake source is ready (then handles it) or the idle timer ends.
    private func waitWhileHalted() {
        let sources = haltSources.withLock { $0.values.flatMap { $0 } }.filter { $0.wanted() }
        guard !sources.isEmpty else {
            halted.wait(timeoutMilliseconds: Self.idleTimeoutMilliseconds)
            return
        }
        var fds = [halted.fd.pollRequest()] + sources.map { $0.fd.pollRequest() }
        let spinUntil = monotonicNanoseconds() + haltPollNanoseconds
        var ready = poll(&fds, nfds_t(fds.count), 0)
        while ready == 0 && monotonicNanoseconds() < spinUntil {
            ready = poll(&fds, nfds_t(fds.count), 0)
        }
        if ready == 0 { ready = poll(&fds, nfds_t(fds.count), Self.idleTimeoutMilliseconds) }
        guard ready > 0 else { return }
        if fds[0].revents != 0 { halted.drain() }
        for (source, p) in zip(sources, fds.dropFirst()) where p.revents != 0 { source.ready() }
    }

    public func terminate() {
        control.update { $0.quit = true }
        requestStop()
        thread?.join()
        thread = nil
    }

    private func threadMain() {
        threadID.store(cl_gettid(), ordering: .relaxed)
        while true {
            control.update { c in if !c.wantRunning { c.parked = true } }
            let quit = control.wait(until: { $0.wantRunning || $0.quit }) { c -> Bool in
                if !c.quit { c.parked = false }
                return c.quit
            } ?? true
            if quit { return }
            vcpu.setImmediateExit(false)
            // A stop requested between un-parking and here must not be lost: it set the
            // flag before immediate_exit, so checking after clearing immediate_exit is enough.
            guard !stopRequested.load(ordering: .sequentiallyConsistent) else { continue }
            runUntilStopped()
        }
    }

    private func runUntilStopped() {
        while !stopRequested.load(ordering: .relaxed) {
            let exit: VCPUExit
            do {
                exit = try vcpu.run()
            } catch {
                fatal("\(error)")
                return
            }
            exitCount.add(1, ordering: .relaxed)
            switch exit {
            case .io(let port, let isWrite, let size, let count, let data):
                bus.handle(port: port, isWrite: isWrite, size: size, count: count, data: data)
            case .halt:
                haltCount.add(1, ordering: .relaxed)
                waitWhileHalted()
            case .interrupted:
                continue
            case .mmio(let address, let isWrite, let data):
                if pci?.handleMMIO(address: address, isWrite: isWrite, data: data) != true {
                    // Unclaimed: reads see all ones, writes are dropped.
                    if !isWrite { data.initializeMemory(as: UInt8.self, repeating: 0xFF) }
                    logger.debug("unhandled MMIO \(isWrite ? "write" : "read") at \(hex(address))")
                }
            case .shutdown:
                fatal("guest triple-faulted (KVM_EXIT_SHUTDOWN)")
                return
            case .internalError(let suberror):
                fatal("KVM internal error, suberror \(suberror)")
                return
            case .failEntry(let reason):
                fatal("KVM entry failed, hardware reason 0x\(String(reason, radix: 16))")
                return
            case .systemEvent(let type):
                fatal("KVM system event \(type)")
                return
            case .other(let reason):
                fatal("unhandled KVM exit reason \(reason)")
                return
            }
        }
        // KVM finishes a port or MMIO exit (the value an IN reads, the RIP past the
        // instruction) only on the next KVM_RUN. With immediate_exit set, that run
        // completes it and returns at once, so a stopped vCPU never has a half-done
        // instruction in its saved state for a migration target to execute twice.
        vcpu.setImmediateExit(true)
        _ = try? vcpu.run()
    }

    private func fatal(_ message: String) {
        var detail = message
        if let regs = try? vcpu.getRegisters(), let sregs = try? vcpu.getSpecialRegisters() {
            detail += " (rip=\(hex(regs.rip)) rsp=\(hex(regs.rsp)) rax=\(hex(regs.rax)) cr0=\(hex(sregs.cr0))"
                + " cr3=\(hex(sregs.cr3)) cr4=\(hex(sregs.cr4)) efer=\(hex(sregs.efer)))"
        }
        control.update { $0.wantRunning = false }
        stopRequested.store(true, ordering: .sequentiallyConsistent)
        onFatal(detail)
    }
}

func monotonicNanoseconds() -> Int64 {
    var now = timespec()
    clock_gettime(CLOCK_MONOTONIC, &now)
    return Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
}

extension EventFD {
    /// Creating an eventfd only fails when the process is out of fds or memory at start-up.
    static func orFatal() -> EventFD {
        do { return try EventFD() } catch { fatalError("\(error)") }
    }
}
