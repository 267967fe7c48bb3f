public enum VMMCoreVersion { public static let string = "0.1.0" }
