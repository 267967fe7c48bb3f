extension JSON: CustomStringConvertible {
    /// The value as JSON text (`{"status": "running"}`), so that test failures and
    /// interpolations show what came over the wire instead of an enum dump.
    public var description: String { serialized }
}
