#!/usr/bin/env bash
# Builds the PVH test guest: build.sh [OUTPUT]  (default: guest.elf beside this script)
# Uses only the Swift toolchain (swiftc, clang, ld.lld, llvm-objdump). The
# output is reproducible: sources are passed by relative path, no debug info,
# no build ID.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
output="${1:-$here/guest.elf}"
case "$output" in
    /*) ;;
    *) output="$PWD/$output" ;;
esac

if command -v swiftc >/dev/null 2>&1; then
    swiftc="$(command -v swiftc)"
elif [ -x /opt/swift/usr/bin/swiftc ]; then
    swiftc=/opt/swift/usr/bin/swiftc
else
    echo "build.sh: swiftc not found (PATH or /opt/swift/usr/bin)" >&2
    exit 1
fi
# clang and ld.lld are taken from the same toolchain as swiftc.
bin="$(dirname "$(readlink -f "$swiftc")")"
for tool in clang ld.lld; do
    if [ ! -x "$bin/$tool" ]; then
        echo "build.sh: $tool not found next to $swiftc" >&2
        exit 1
    fi
done

work="$(mktemp -d "${TMPDIR:-/tmp}/guest-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

target=x86_64-unknown-none-elf
swift_sources=(Boot.swift Machine.swift Serial.swift Console.swift Text.swift LineReader.swift Shell.swift Commands.swift Scribble.swift
    PageTables.swift PCI.swift VirtioPCI.swift Virtqueue.swift VirtioNet.swift Clock.swift
    Bytes.swift Network.swift ARP.swift IPv4.swift Ping.swift NetCommands.swift)

cd "$here"

# The guest cannot execute SSE/MMX (KVM emulation failure), so no vector or
# FP registers anywhere, including compiler-generated memcpy/memset.
for asm in entry dma; do
    "$bin/clang" -target "$target" -mgeneral-regs-only -ffreestanding -fno-pic \
        -c "$asm.S" -o "$work/$asm.o"
done

"$swiftc" -enable-experimental-feature Embedded -target "$target" \
    -module-name Guest -parse-as-library -wmo -Osize \
    -Xcc -mno-sse -Xcc -mno-sse2 -Xcc -mno-mmx \
    -Xcc -fomit-frame-pointer \
    -Xfrontend -disable-stack-protector -Xfrontend -function-sections \
    -I include -module-cache-path "$work/module-cache" \
    -c "${swift_sources[@]}" -o "$work/guest.o"

"$bin/ld.lld" -static -nostdlib --gc-sections --build-id=none \
    -z norelro -z noexecstack -T guest.ld \
    "$work/entry.o" "$work/dma.o" "$work/guest.o" -o "$work/guest.elf"

if [ -x "$bin/llvm-objdump" ]; then
    if "$bin/llvm-objdump" -d "$work/guest.elf" | grep -E 'xmm|ymm|zmm|%mm[0-7]|%st\b|%st\(' >&2; then
        echo "build.sh: SSE/MMX/x87 instructions in the guest image (listed above)" >&2
        exit 1
    fi
else
    echo "build.sh: llvm-objdump not found; SSE/MMX check skipped" >&2
fi

mkdir -p "$(dirname "$output")"
cp "$work/guest.elf" "$output.tmp.$$"
mv -f "$output.tmp.$$" "$output"
echo "build.sh: wrote $output ($(wc -c <"$output") bytes)"
