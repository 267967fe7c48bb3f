import TestKit
import Testing
@testable import VMMCore

/// The real /dev/vhost-net, where it exists.
@Suite struct VhostKernelDeviceTests {
    /// On a host with vhost-net (skips here with the reason): what `setUp` relies on.
    @Test(.requiresVhostNet) func realDeviceOwnershipAndFeatures() throws {
        let device = try VhostNetDevice.open(label: "test vhost-net")
        try device.perform(.setOwner)
        #expect { try device.perform(.setOwner) } throws: { "\($0)" == "VHOST_SET_OWNER: Device or resource busy" }
        let features = try device.perform(.getFeatures)
        #expect(features & VhostKernel.featureVersion1 != 0, "features \(hex(features))")
        #expect(features & VhostKernel.featureLogAll != 0, "features \(hex(features))")
        #expect(features & VhostKernel.featureVirtioNetHeader != 0, "features \(hex(features))")
        try device.perform(.setFeatures(VhostKernel.featureVersion1))
        #expect(try device.perform(.getVringBase(index: 0)) == 0)
        try device.perform(.resetOwner)
        try device.perform(.setOwner)
    }
}
