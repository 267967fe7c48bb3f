import CPU

/// `scribble ROUNDS`: a memory workload for testing migration's dirty-page tracking.
/// Each round first checks that every page of a 1 MiB scratch area still holds the
/// previous round's number, then writes the new one. A page the guest wrote during
/// pre-copy that the VMM failed to send again shows up on the target as a page one
/// round behind, reported with its address.
enum Scribble {
    /// Free RAM well above the image (1 MiB to about 2.1 MiB); every test guest has 64 MiB or more.
    static let area: UInt = 0x100_0000
    static let pages = 256
    static let wordsPerPage = 512
    nonisolated(unsafe) private static var started = false

    static func run(_ arguments: Text) {
        guard let rounds = arguments.trimmingLeadingBlanks().decimalValue(), rounds > 0 else {
            Console.writeLine("usage: scribble ROUNDS")
            return
        }
        let words = UnsafeMutablePointer<UInt64>(bitPattern: area)!
        // The area is outside the image, so it may hold anything (a reused RAM
        // file, an earlier guest): the first run of this boot starts it at round 0.
        // The flag lives in .bss, which the loader zeroes and migration carries.
        if !started {
            mem_zero(words, UInt64(pages &* wordsPerPage &* 8))
            started = true
        }
        // Continue where an earlier run stopped: page 0 holds the last round written.
        var round = words[0]
        for _ in 0..<rounds {
            for page in 0..<pages {
                let word = words + page &* wordsPerPage
                guard word.pointee == round else {
                    Console.write("scribble: page at ")
                    Console.write(decimal: UInt64(area &+ UInt(page &* 4096)))
                    Console.write(" holds round ")
                    Console.write(decimal: word.pointee)
                    Console.write(", expected ")
                    Console.write(decimal: round)
                    Console.newline()
                    return
                }
                word.pointee = round &+ 1
            }
            round &+= 1
        }
        Console.write("scribble ok, round ")
        Console.write(decimal: round)
        Console.newline()
    }
}
