#!/usr/bin/env python3
"""Captures a migration stream of the current format from a real vmm, for the fixtures here.

usage (root, from the repository root, after `swift build`):
    Tests/Fixtures/streams/capture.py NAME [--queues N] [--local | --cpr] [--vhost-user]
NAME starts with the stream version the build writes (v2-..., v3-...); keep every
version's fixtures: a unit test loads them all with the current code.
Boots the bundled guest (64M) with one virtio-net NIC on a TAP in a scratch network
namespace, waits for its prompt, migrates it to a unix socket this script listens on
(standing in for the target: it answers the switch-over and end sections) and writes
NAME.stream plus NAME.fds.json: which sections claimed how many fds (fds cannot be
stored; the loader test binds stand-ins for them). --local: migration parameter
`local`, `x-ignore-shared` and a shared memfd, so TAP queues and RAM travel as fds.
--cpr: mode `cpr-transfer` with the netdev `cpr=on`: the cpr channel's stream (header and
the cpr state, with the RAM memfd and the TAP queues) goes to NAME.cpr.stream and
NAME.cpr.fds.json, the main channel's to NAME.stream and NAME.fds.json.
--vhost-user: the NIC on the bundled vhost-user-net (on the TAP; RAM a shared memfd);
with --local its backend connection travels as the NIC's one fd (descriptor kind 2).
"""
import argparse, array, json, os, socket, struct, subprocess, sys, tempfile, time

ap = argparse.ArgumentParser()
ap.add_argument("name"); ap.add_argument("--queues", type=int, default=1); ap.add_argument("--local", action="store_true")
ap.add_argument("--cpr", action="store_true"); ap.add_argument("--vhost-user", action="store_true")
args = ap.parse_args()
here = os.path.dirname(os.path.abspath(__file__))
tmp = tempfile.mkdtemp(prefix="svmm-capture-")
ns = f"svmm-capture-{os.getpid()}"
subprocess.run(["ip", "netns", "add", ns], check=True)
proc = backend = None
try:
    mq = ["multi_queue"] if args.queues > 1 else []
    subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap"] + mq, check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "tap0", "up"], check=True)
    console, qmp_path, mig = f"{tmp}/console", f"{tmp}/qmp.sock", f"{tmp}/mig.sock"
    ram = ["-object", "memory-backend-memfd,id=m0,size=64M,share=on", "-machine", "memory-backend=m0"] if args.local or args.vhost_user else []
    netdev = ["-netdev", f"tap,id=n0,ifname=tap0,queues={args.queues},script=no,downscript=no{',cpr=on' if args.cpr else ''}"]
    if args.vhost_user:
        vu = f"{tmp}/vu.sock"
        backend = subprocess.Popen(["ip", "netns", "exec", ns, ".build/debug/vhost-user-net", "--socket", vu, "--tap", "tap0",
                                    "--queues", str(args.queues)])
        while not os.path.exists(vu):
            if backend.poll() is not None: raise SystemExit("vhost-user-net did not start")
            time.sleep(0.05)
        netdev = ["-chardev", f"socket,id=c0,path={vu}", "-netdev", f"vhost-user,id=n0,chardev=c0,queues={args.queues}"]
    cmd = ["ip", "netns", "exec", ns, ".build/debug/vmm", "-m", "64M", "-kernel", "assets/guest/guest.elf", *ram,
           "-serial", f"unix:{console},server=on,wait=off", "-qmp", f"unix:{qmp_path},server=on,wait=off", *netdev,
           "-device", f"virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56,mq={'on' if args.queues > 1 else 'off'}"]
    proc = subprocess.Popen(cmd)
    deadline = time.time() + 60
    while not os.path.exists(console) or not os.path.exists(qmp_path):
        if time.time() > deadline or proc.poll() is not None: raise SystemExit("the VMM did not start")
        time.sleep(0.1)
    tty = socket.socket(socket.AF_UNIX); tty.connect(console); tty.settimeout(60); transcript = b""
    def until(text):
        global transcript
        while text.encode() not in transcript: transcript += tty.recv(4096)
        transcript = transcript[transcript.index(text.encode()) + len(text):]
    tty.sendall(b"\r"); until("# ")
    # The guest's driver sets the NIC up (DRIVER_OK, all queue pairs) with these.
    for line in ["ip addr add 10.0.0.2/24 dev eth0", "ip link set eth0 up"]:
        tty.sendall(line.encode() + b"\r"); until(line); until("# ")
    q = socket.socket(socket.AF_UNIX); q.connect(qmp_path); qf = q.makefile("rw")
    def qmp(cmd, **arguments):
        qf.write(json.dumps({"execute": cmd, "arguments": arguments}) + "\n"); qf.flush()
        while True:
            reply = json.loads(qf.readline())
            if "return" in reply or "error" in reply:
                if "error" in reply: raise SystemExit(f"{cmd}: {reply['error']}")
                return reply["return"]
    qf.readline(); qmp("qmp_capabilities")
    if args.local:
        qmp("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
        qmp("migrate-set-parameters", local=True)
    def read_stream(conn, sections=None):
        """The stream on `conn` until its end section (answering the switch-over and the
        end), or until `sections` sections arrived: (bytes, fds received, claims)."""
        data, received, claims = bytearray(), [0], []
        def need(n):
            while len(data) < n:
                msg, anc, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(64 * 4))
                if not msg: raise SystemExit(f"EOF after {len(data)} bytes")
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i"); fds.frombytes(payload[:len(payload) - len(payload) % 4])
                        received[0] += len(fds)
                        for fd in fds: os.close(fd)
                data.extend(msg)
        need(12); off = 12; count = 0
        version = struct.unpack_from("<I", data, 8)[0]
        while sections is None or count < sections:
            need(off + 4)
            length = struct.unpack_from("<I", data, off)[0]
            need(off + 4 + length)
            kind = data[off + 4]
            name_len = struct.unpack_from("<I", data, off + 5)[0]
            name = data[off + 9: off + 9 + name_len].decode()
            fd_count = struct.unpack_from("<H", data, off + 9 + name_len)[0]
            names, at = [], off + 11 + name_len  # v3: the fds' names follow their count
            for _ in range(fd_count if version >= 3 else 0):
                n = struct.unpack_from("<I", data, at)[0]; names.append(data[at + 4: at + 4 + n].decode()); at += 4 + n
            if fd_count: claims.append({"kind": kind, "section": name, "fds": fd_count, **({"names": names} if names else {})})
            off += 4 + length; count += 1
            if kind == 6: conn.sendall(b"\x05")
            if kind == 0xFF: conn.sendall(b"\x06"); break
        return bytes(data), received[0], claims, version

    def save(name, data, received, claims, version):
        open(f"{here}/{name}.stream", "wb").write(data)
        json.dump({"received": received, "claims": claims}, open(f"{here}/{name}.fds.json", "w"), indent=1)
        print(f"{name}: stream v{version}, {len(data)} bytes, {received} fd(s): {claims}")

    srv = socket.socket(socket.AF_UNIX); srv.bind(mig); srv.listen(1)
    if args.cpr:
        cpr_path = f"{tmp}/cpr.sock"
        cpr_srv = socket.socket(socket.AF_UNIX); cpr_srv.bind(cpr_path); cpr_srv.listen(1)
        qmp("migrate-set-parameters", mode="cpr-transfer")
        unix = lambda kind, path: {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": path}}
        qmp("migrate", channels=[unix("main", mig), unix("cpr", cpr_path)])
        cpr_conn, _ = cpr_srv.accept()
        save(f"{args.name}.cpr", *read_stream(cpr_conn, sections=1))
        cpr_conn.close()  # the source connects the main channel once the cpr channel closes
    else:
        qmp("migrate", uri=f"unix:{mig}")
    conn, _ = srv.accept()
    save(args.name, *read_stream(conn))
    qmp("quit")
finally:
    if proc:
        try: proc.wait(10)
        except subprocess.TimeoutExpired: proc.kill(); proc.wait()
    if backend: backend.terminate(); backend.wait()
    subprocess.run(["ip", "netns", "del", ns])
    subprocess.run(["rm", "-rf", tmp])
