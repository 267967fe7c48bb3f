// swift-tools-version:6.2
// A VMM developer's own package with functional tests written against TestKit's public
// API only. It depends on swift-vmm by path; `vmm` is listed so that `swift test` builds
// the VMM the tests launch (without it every test skips: "VMM binary 'vmm' not found").
import PackageDescription

let package = Package(
    name: "TestKitExample",
    dependencies: [
        .package(name: "SwiftVMM", path: "../.."),
    ],
    targets: [
        .testTarget(
            name: "ExampleTests",
            dependencies: [
                .product(name: "TestKit", package: "SwiftVMM"),
                .product(name: "QMPWire", package: "SwiftVMM"),
                .product(name: "vmm", package: "SwiftVMM"),
            ]
        ),
    ]
)
