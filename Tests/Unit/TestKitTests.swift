import Testing

/// Parent of every TestKit unit suite. Serialized so that the fd and thread counts in
/// the leak tests see only what the test under way opened.
@Suite(.serialized) struct TestKitTests {}
