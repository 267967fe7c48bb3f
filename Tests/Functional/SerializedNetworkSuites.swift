import TestKit
import Testing

/// The suites that count lost packets or move running guests. They run one at a time:
/// two host cores cannot carry several such guests, their pingers and a pre-copy at
/// once without losing packets to scheduling, which would make the loss checks measure
/// the test runner instead of the VMM.
@Suite(.serialized, .usesProcessResources, .keepsArtifactsOnFailure, .timeLimit(.minutes(5))) enum SerializedNetworkSuites {}
