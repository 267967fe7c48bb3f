/// One shell command. `run` gets the argument text with leading spaces removed.
struct Command {
    let name: StaticString
    let usage: StaticString
    let summary: StaticString
    /// Thin: a bare code pointer with no closure context, so the table stays
    /// constant data and dispatch needs no retain/release.
    let run: @convention(thin) (Text) -> Void
}

/// The command table; `help` lists it in this order. Add new commands here.
let commands: [Command] = [
    Command(name: "echo", usage: "echo [TEXT]", summary: "print TEXT", run: Commands.echo),
    Command(name: "help", usage: "help", summary: "list commands", run: Commands.help),
    Command(name: "uname", usage: "uname", summary: "print guest name and version", run: Commands.uname),
    Command(name: "ticks", usage: "ticks", summary: "print the idle tick counter", run: Commands.ticks),
    Command(name: "ip", usage: "ip addr|link", summary: "show or set eth0: addr add|del A.B.C.D/N dev eth0, link set eth0 up|down", run: NetCommands.ip),
    Command(name: "ping", usage: "ping ADDRESS", summary: "echo requests once a second [-c COUNT] [-W SECONDS]", run: NetCommands.ping),
    Command(name: "stats", usage: "stats", summary: "print frames per queue pair", run: NetCommands.stats),
    Command(name: "scribble", usage: "scribble ROUNDS", summary: "check and rewrite 1 MiB of RAM ROUNDS times", run: Scribble.run),
    Command(name: "poweroff", usage: "poweroff", summary: "power the machine off", run: Commands.powerOff),
]

enum Shell {
    static let prompt: StaticString = "# "

    static func run() -> Never {
        Console.writeLine(GuestInfo.banner)
        var reader = LineReader()
        while true {
            Console.write(prompt)
            let line = reader.read()
            Console.newline()
            execute(line)
        }
    }

    static func execute(_ line: Text) {
        let (name, arguments) = line.trimmingLeadingBlanks().splitFirstWord()
        if name.isEmpty {
            return
        }
        for command in commands where name.equals(command.name) {
            command.run(arguments)
            return
        }
        Console.write("sh: ")
        Console.write(name)
        Console.writeLine(": not found")
    }
}
