import Foundation

/// Which VMM executable a test runs, and the arguments it always gets.
///
/// The default is the project's own `vmm`, built by SwiftPM next to the test binary.
/// `TESTKIT_VMM=/path/or/name` runs another one instead; any binary that takes QEMU's
/// command line works, and one named `qemu-system-*` gets `qemuDefaultArguments`.
/// `TESTKIT_VMM_ARGS="..."` (split at whitespace) replaces the default arguments.
public struct VMMBinary: Sendable, Equatable, CustomStringConvertible {
    public static let environmentKey = "TESTKIT_VMM"
    public static let argumentsEnvironmentKey = "TESTKIT_VMM_ARGS"
    public static let bundledName = "vmm"

    /// What QEMU needs to behave like the bundled VMM: the small KVM machine, no default
    /// devices, no config files read from the host, no window.
    public static let qemuDefaultArguments = [
        "-machine", "microvm", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
    ]

    /// Absolute path.
    public var path: String
    public var defaultArguments: [String]

    public var name: String { (path as NSString).lastPathComponent }
    public var isQEMU: Bool { name.hasPrefix("qemu-system-") }
    public var description: String { ([path] + defaultArguments).joined(separator: " ") }

    /// `defaultArguments` nil picks them by name: QEMU's for `qemu-system-*`, none otherwise.
    public init(path: String, defaultArguments: [String]? = nil) {
        self.path = path
        let isQEMU = (path as NSString).lastPathComponent.hasPrefix("qemu-system-")
        self.defaultArguments = defaultArguments ?? (isQEMU ? Self.qemuDefaultArguments : [])
    }

    /// A binary given by path, or by name looked up on PATH (`"qemu-system-x86_64"`).
    public static func named(
        _ nameOrPath: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws -> VMMBinary {
        guard let path = findExecutable(nameOrPath, environment: environment) else {
            throw VMMBinaryError.notFound(nameOrPath, searched: searchPath(environment))
        }
        return VMMBinary(path: path)
    }

    /// `$TESTKIT_VMM` if set, else the bundled `vmm`; `$TESTKIT_VMM_ARGS` applied to either.
    public static func resolve(environment: [String: String] = ProcessInfo.processInfo.environment) throws -> VMMBinary {
        var binary: VMMBinary
        if let override = environment[environmentKey], !override.isEmpty {
            binary = try named(override, environment: environment)
        } else {
            binary = try bundled()
        }
        if let arguments = environment[argumentsEnvironmentKey] {
            binary.defaultArguments = arguments.split(whereSeparator: \.isWhitespace).map(String.init)
        }
        return binary
    }

    /// The `vmm` SwiftPM built into the same directory as the running test binary.
    public static func bundled(executable: String? = nil) throws -> VMMBinary {
        let executable = executable ?? runningExecutable()
        let candidates = bundledCandidates(executable: executable)
        for candidate in candidates where isExecutableFile(candidate) {
            return VMMBinary(path: candidate)
        }
        throw VMMBinaryError.bundledNotBuilt(searched: candidates)
    }

    /// `.build/debug/Pkg.xctest` (an executable on Linux) → `.build/debug/vmm`. Inside a
    /// bundle (`.build/debug/Pkg.xctest/Contents/MacOS/Pkg`) vmm sits next to the bundle.
    static func bundledCandidates(executable: String) -> [String] {
        var candidates = [((executable as NSString).deletingLastPathComponent as NSString).appendingPathComponent(bundledName)]
        var path = executable
        while path.count > 1 {
            let parent = (path as NSString).deletingLastPathComponent
            if (path as NSString).lastPathComponent.hasSuffix(".xctest") {
                let candidate = (parent as NSString).appendingPathComponent(bundledName)
                if !candidates.contains(candidate) { candidates.append(candidate) }
                break
            }
            if parent == path { break }
            path = parent
        }
        return candidates
    }

    static func runningExecutable() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }

    static func searchPath(_ environment: [String: String]) -> [String] {
        (environment["PATH"] ?? "/usr/local/bin:/usr/bin:/bin").split(separator: ":").map(String.init)
    }

    /// A path with a slash is taken as is (made absolute); a bare name is looked up on PATH.
    public static func findExecutable(
        _ nameOrPath: String, environment: [String: String] = ProcessInfo.processInfo.environment
    ) -> String? {
        if nameOrPath.contains("/") {
            let absolute = nameOrPath.hasPrefix("/")
                ? nameOrPath
                : (FileManager.default.currentDirectoryPath as NSString).appendingPathComponent(nameOrPath)
            return isExecutableFile(absolute) ? absolute : nil
        }
        for directory in searchPath(environment) {
            let candidate = (directory as NSString).appendingPathComponent(nameOrPath)
            if isExecutableFile(candidate) { return candidate }
        }
        return nil
    }

    static func isExecutableFile(_ path: String) -> Bool {
        var isDirectory: ObjCBool = false
        return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && !isDirectory.boolValue
            && access(path, X_OK) == 0
    }
}

public enum VMMBinaryError: Error, CustomStringConvertible {
    case notFound(String, searched: [String])
    case bundledNotBuilt(searched: [String])

    public var description: String {
        switch self {
        case .notFound(let name, let searched):
            return "VMM binary '\(name)' not found (searched: \(searched.joined(separator: ", ")))"
        case .bundledNotBuilt(let searched):
            return "bundled vmm not built (looked at \(searched.joined(separator: ", "))); "
                + "run `swift build --product vmm` or set \(VMMBinary.environmentKey)=/path/to/vmm"
        }
    }
}

/// The test guest shipped in `assets/guest`: `$TESTKIT_GUEST`, else
/// `<package root>/assets/guest/guest.elf`, the root found from this source file's path.
public enum BundledGuest {
    public static let environmentKey = "TESTKIT_GUEST"

    public static var image: String { image(environment: ProcessInfo.processInfo.environment) }

    public static func image(environment: [String: String]) -> String {
        if let override = environment[environmentKey], !override.isEmpty { return override }
        return (packageRoot as NSString).appendingPathComponent("assets/guest/guest.elf")
    }

    public static var exists: Bool { FileManager.default.isReadableFile(atPath: image) }

    /// `<root>/Sources/TestKit/VMMBinary.swift` → `<root>`.
    public static let packageRoot: String = {
        var path = #filePath as NSString
        for _ in 0..<3 { path = path.deletingLastPathComponent as NSString }
        return path as String
    }()
}
