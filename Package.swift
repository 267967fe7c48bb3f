// swift-tools-version:6.2
import PackageDescription

let package = Package(
    name: "SwiftVMM",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "vmm", targets: ["vmm"]),
        .executable(name: "vmm-bench", targets: ["vmm-bench"]),
        .executable(name: "vhost-user-net", targets: ["vhost-user-net"]),
        .library(name: "VMMCore", targets: ["VMMCore"]),
        .library(name: "TestKit", targets: ["TestKit"]),
        .library(name: "QMPWire", targets: ["QMPWire"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-log.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.5.0"),
    ],
    targets: [
        // Kernel UAPI (KVM, TUN, memfd, eventfd) for Swift: ioctl numbers as constants, union accessors.
        .target(name: "CLinux"),
        .systemLibrary(
            name: "CNetlink",
            pkgConfig: "libnl-route-3.0",
            providers: [.apt(["libnl-3-dev", "libnl-route-3-dev"])]
        ),
        .systemLibrary(
            name: "CCap",
            pkgConfig: "libcap",
            providers: [.apt(["libcap-dev"])]
        ),
        // JSON values and QMP message shapes shared by the VMM's server and TestKit's client.
        .target(name: "QMPWire", linkerSettings: [.linkedLibrary("m")]),
        .target(
            name: "VMMCore",
            dependencies: [
                "CLinux",
                "QMPWire",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(name: "vmm", dependencies: ["VMMCore"]),
        // The bundled vhost-user-net backend (a TAP behind a vhost-user socket).
        .executableTarget(name: "vhost-user-net", dependencies: ["VMMCore"]),
        .target(
            name: "TestKit",
            dependencies: ["QMPWire", "CCap", "CNetlink", "CLinux"]
        ),
        .executableTarget(
            name: "vmm-bench",
            dependencies: ["TestKit", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(name: "Unit", dependencies: ["VMMCore", "QMPWire", "TestKit"]),
        // Resources/: scripts the tests run with python3, found by path (#filePath).
        .testTarget(name: "Functional", dependencies: ["TestKit", "vmm", "vhost-user-net"], exclude: ["Resources"]),
    ]
)

// libFuzzer targets (Fuzz/<name>/, run by `ci/fuzz`, results in docs/reliability.md). Their
// `main` starts libFuzzer's driver, which exists only in binaries linked with
// `-sanitize=fuzzer`, so they exist only when FUZZ=1: `ci/fuzz` sets it together with that
// flag and its own scratch path (.build-fuzz). A plain `swift build`/`swift test` never sees them.
if Context.environment["FUZZ"] == "1" {
    package.targets += [
        .target(name: "CFuzzDriver", path: "Fuzz/CFuzzDriver"),
        .target(name: "FuzzSupport", dependencies: ["CFuzzDriver"], path: "Fuzz/FuzzSupport"),
    ]
    for name in ["qmp", "cli", "migration", "virtqueue", "virtio-net", "elf", "vhost-user"] {
        package.targets.append(.executableTarget(
            name: "fuzz-\(name)",
            dependencies: ["FuzzSupport", "VMMCore", "QMPWire"],
            path: "Fuzz/\(name)"
        ))
    }
}
