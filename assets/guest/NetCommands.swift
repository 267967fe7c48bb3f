/// `ip`, `ping` and `stats`: the network commands, in the subset and
/// output style of busybox that tests written against a busybox guest use.
enum NetCommands {
    /// `ip addr [show] [dev eth0]`, `ip addr add|del A.B.C.D/N dev eth0`,
    /// `ip addr flush dev eth0`, `ip link [show]`, `ip link set [dev] eth0 up|down`.
    static func ip(_ arguments: Text) {
        let (object, rest) = arguments.splitFirstWord()
        let isAddress = object.equals("addr") || object.equals("address") || object.equals("a")
        let isLink = object.equals("link") || object.equals("l")
        guard isAddress || isLink else {
            Console.writeLine("Usage: ip addr [add|del A.B.C.D/N dev eth0] | ip link [set eth0 up|down]")
            return
        }
        guard Network.attach() else {
            Console.writeLine("ip: eth0: no such device")
            return
        }
        let (command, options) = rest.splitFirstWord()
        if command.isEmpty || command.equals("show") || command.equals("list") {
            if checkDeviceOption(options, required: false) {
                showInterface(withAddress: isAddress)
            }
        } else if isAddress && (command.equals("add") || command.equals("del") || command.equals("flush")) {
            changeAddress(command, options)
        } else if isLink && command.equals("set") {
            setLink(options)
        } else {
            Console.write("ip: unknown command '")
            Console.write(command)
            Console.writeLine("'")
        }
    }

    /// eth0 has at most one address: `add` replaces it.
    private static func changeAddress(_ command: Text, _ options: Text) {
        if command.equals("flush") {
            if checkDeviceOption(options, required: true) {
                Network.address = 0
                Network.prefixLength = 0
            }
            return
        }
        let (text, deviceOptions) = options.splitFirstWord()
        guard let (address, prefixLength) = text.ipv4Prefix() else {
            Console.write("ip: invalid address '")
            Console.write(text)
            Console.writeLine("'")
            return
        }
        guard checkDeviceOption(deviceOptions, required: true) else { return }
        if command.equals("add") {
            if Network.address == address && Network.prefixLength == prefixLength {
                Console.writeLine("ip: RTNETLINK answers: File exists")
                return
            }
            Network.address = address
            Network.prefixLength = prefixLength
        } else if Network.address == address {
            Network.address = 0
            Network.prefixLength = 0
        } else {
            Console.writeLine("ip: RTNETLINK answers: Cannot assign requested address")
        }
    }

    /// `[dev] eth0 up|down`; down keeps the NIC polled but drops every frame.
    private static func setLink(_ options: Text) {
        var (name, state) = options.splitFirstWord()
        if name.equals("dev") {
            (name, state) = state.splitFirstWord()
        }
        guard checkDevice(name) else { return }
        if state.equals("up") {
            Network.isUp = true
        } else if state.equals("down") {
            Network.isUp = false
        } else {
            Console.writeLine("ip: expected 'up' or 'down'")
        }
    }

    /// Checks a `[dev] NAME` option: true when NAME is eth0, or when it is
    /// missing and may be; prints why not otherwise.
    private static func checkDeviceOption(_ options: Text, required: Bool) -> Bool {
        var (name, rest) = options.splitFirstWord()
        if name.equals("dev") {
            name = rest.splitFirstWord().word
        }
        if name.isEmpty {
            if required {
                Console.writeLine("ip: expected 'dev eth0'")
            }
            return !required
        }
        return checkDevice(name)
    }

    private static func checkDevice(_ name: Text) -> Bool {
        if name.equals("eth0") {
            return true
        }
        Console.write("ip: can't find device '")
        Console.write(name)
        Console.writeLine("'")
        return false
    }

    private static func showInterface(withAddress: Bool) {
        Console.write("2: eth0: <BROADCAST,MULTICAST")
        if Network.isUp {
            Console.write(VirtioNet.hasCarrier ? ",UP,LOWER_UP" : ",UP")
        }
        Console.writeLine("> mtu 1500")
        Console.write("    link/ether ")
        Console.write(mac: VirtioNet.mac)
        Console.writeLine(" brd ff:ff:ff:ff:ff:ff")
        if withAddress && Network.address != 0 {
            Console.write("    inet ")
            Console.write(ipv4: Network.address)
            Console.write(UInt8(ascii: "/"))
            Console.write(decimal: UInt64(Network.prefixLength))
            Console.writeLine(" scope global eth0")
        }
    }

    /// `ping [-c COUNT] [-W SECONDS] ADDRESS`
    static func ping(_ arguments: Text) {
        var count: UInt64 = 0
        var timeout: UInt64 = 10
        var rest = arguments
        var target: Text? = nil
        while !rest.isEmpty {
            let (word, next) = rest.splitFirstWord()
            rest = next
            if word.equals("-c") || word.equals("-W") {
                let (value, after) = rest.splitFirstWord()
                rest = after
                guard let number = value.decimalValue(limit: 1_000_000) else {
                    Console.write("ping: invalid number '")
                    Console.write(value)
                    Console.writeLine("'")
                    return
                }
                if word.equals("-c") {
                    count = number
                } else {
                    timeout = number
                }
            } else if word.count > 0 && word[0] == UInt8(ascii: "-") {
                Console.write("ping: unsupported option ")
                Console.write(word)
                Console.newline()
                return
            } else {
                target = word
            }
        }
        guard let target else {
            Console.writeLine("Usage: ping [-c COUNT] [-W SECONDS] ADDRESS")
            return
        }
        guard let (address, prefixLength) = target.ipv4Prefix(), prefixLength == 32 else {
            Console.write("ping: bad address '")
            Console.write(target)
            Console.writeLine("'")
            return
        }
        Ping.run(address, count: Int(count), timeout: timeout)
    }

    /// Frames per queue pair since the NIC started, from counters in guest RAM.
    static func stats(_ arguments: Text) {
        guard Network.attach() else {
            Console.writeLine("stats: eth0: no such device")
            return
        }
        var received: UInt64 = 0
        var sent: UInt64 = 0
        var pair = 0
        while pair < VirtioNet.pairs {
            let rx = VirtioNet.receivedFrames[pair]
            let tx = VirtioNet.sentFrames[pair]
            Console.write("rx")
            Console.write(decimal: UInt64(pair))
            Console.write(": ")
            Console.write(decimal: rx)
            Console.write(" packets tx")
            Console.write(decimal: UInt64(pair))
            Console.write(": ")
            Console.write(decimal: tx)
            Console.writeLine(" packets")
            received &+= rx
            sent &+= tx
            pair += 1
        }
        Console.write("total: rx ")
        Console.write(decimal: received)
        Console.write(" packets tx ")
        Console.write(decimal: sent)
        Console.write(" packets, ")
        Console.write(decimal: VirtioNet.badFrames)
        Console.write(" bad, ")
        Console.write(decimal: VirtioNet.sendDrops)
        Console.writeLine(" send drops")
    }
}
