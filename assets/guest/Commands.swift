enum GuestInfo {
    static let banner: StaticString = "SwiftVMM test guest 0.1.0"
    static let uname: StaticString = "SwiftGuest 0.1.0 x86_64"
}

/// Implementations of the built-in commands listed in `commands`.
enum Commands {
    static func echo(_ arguments: Text) {
        Console.write(arguments)
        Console.newline()
    }

    static func help(_ arguments: Text) {
        let column = 14
        for command in commands {
            Console.write(command.usage)
            var width = command.usage.utf8CodeUnitCount
            repeat {
                Console.write(UInt8(ascii: " "))
                width += 1
            } while width < column
            Console.writeLine(command.summary)
        }
    }

    static func uname(_ arguments: Text) {
        Console.writeLine(GuestInfo.uname)
    }

    static func ticks(_ arguments: Text) {
        Console.write(decimal: Machine.ticks)
        Console.newline()
    }

    static func powerOff(_ arguments: Text) {
        Console.writeLine("Power down.")
        Machine.powerOff()
    }
}
