"""Loader-only stand-ins for the CUDA libraries that a CUDA build of torch links but a CPU run
never calls, so that the build imports on a machine without them (and without a GPU).

Usage: python scripts/cuda_stubs.py TORCH_LIB_DIR OUT_DIR [REAL_SONAME,...]

Reads the ELF dynamic section and symbol tables of torch's own libraries (readelf), finds each
NEEDED library that torch does not ship, is not a system library and is not in REAL (installed
for real: e.g. the CUDA runtime and CUPTI, which libtorch_cpu.so links), and builds OUT_DIR/<soname>
with gcc: every symbol torch wants from it (with its version node), each function returning 100
(cudaErrorNoDevice; a nonzero status for the other libraries too), each data object 256 zero
bytes. torch finds no GPU through them (torch.cuda.is_available() is False); nothing on the CPU
path calls them. Writes OUT_DIR/CUDA_STUBS.txt naming every stub.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

SYSTEM = ("libc.", "libm.", "libdl", "libpthread", "librt", "libstdc", "libgcc", "ld-linux")
SKIP_SYMBOLS = ("Py", "_Py", "__gmon", "_ITM", "_Jv")  # the interpreter's, or toolchain hooks
SYSTEM_VERSIONS = ("GLIBC", "CXXABI", "GCC_")


def _readelf(*args: str) -> list[str]:
    return subprocess.run(["readelf", *args], capture_output=True, text=True,
                          check=True).stdout.splitlines()


def version_files(path: str) -> dict[str, str]:
    """{version node: the library that must define it}, from the version-needs section."""
    found, current = {}, ""
    for line in _readelf("-V", "-W", path):
        if "File:" in line:
            current = line.split("File:")[1].split()[0]
        elif "Name:" in line and current:
            found[line.split("Name:")[1].split()[0]] = current
    return found


def scan(paths: list[str]) -> tuple[set[str], set[str], dict[tuple[str, str], str],
                                   dict[str, str]]:
    """(NEEDED sonames, defined symbols, {(undefined symbol, version): ELF type},
    {version node: soname})."""
    needed, defined, wanted, owners = set(), set(), {}, {}
    for path in paths:
        needed |= {ln.split("[")[1].rstrip("]") for ln in _readelf("-d", path) if "NEEDED" in ln}
        owners.update(version_files(path))
        for line in _readelf("--dyn-syms", "-W", path):
            parts = line.split()
            if len(parts) < 8 or not parts[0].rstrip(":").isdigit():
                continue
            kind, index, name = parts[3], parts[6], parts[7]
            base, _, version = name.partition("@")
            version = version.lstrip("@")
            if index != "UND":
                defined.add(base)
            elif not version.startswith(SYSTEM_VERSIONS) and not base.startswith(SKIP_SYMBOLS):
                wanted[(base, version)] = kind
    return needed, defined, wanted, owners


def build(soname: str, versioned: dict[str, list[tuple[str, str]]],
          loose: list[tuple[str, str]], out: str) -> None:
    """One stub library: ``versioned`` {version node: symbols}, ``loose`` unversioned."""
    symbols = [x for group in versioned.values() for x in group] + loose
    lines = [f"char {b}[256];" if k == "OBJECT" else f"int {b}(void) {{ return 100; }}"
             for b, k in symbols]
    source = os.path.join(out, soname + ".c")
    with open(source, "w", encoding="ascii") as handle:
        handle.write("\n".join(lines) + "\n")
    command = ["gcc", "-shared", "-fPIC", "-w", "-o", os.path.join(out, soname), source,
               f"-Wl,-soname,{soname}"]
    if versioned:
        script = os.path.join(out, soname + ".map")
        with open(script, "w", encoding="ascii") as handle:
            for node, group in versioned.items():
                handle.write(f"{node} {{ global: {' '.join(b + ';' for b, _ in group)} }};\n")
        command.append(f"-Wl,--version-script={script}")
    subprocess.run(command, check=True)
    os.remove(source)
    if versioned:
        os.remove(script)


def system_symbols() -> set[str]:
    """Names the C and C++ runtimes define: a stub must never define one (an unversioned stub
    definition would take their place for torch's own references)."""
    found: set[str] = set()
    for line in subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        name, _, path = line.strip().partition(" => ")
        if name.split()[0].startswith(SYSTEM) and "x86-64" in name:
            found |= {ln.split()[7].split("@")[0] for ln in _readelf("--dyn-syms", "-W", path)
                      if len(ln.split()) >= 8 and ln.split()[6] != "UND"}
    return found


def main(lib_dir: str, out: str, real: set[str]) -> int:
    ours = glob.glob(os.path.join(lib_dir, "*.so*"))
    ours += glob.glob(os.path.join(lib_dir, "..", "*.so"))
    needed, defined, wanted, owners = scan(ours)
    defined |= system_symbols()
    shipped = {os.path.basename(p) for p in ours}
    missing = sorted(n for n in needed
                     if n not in shipped and n not in real and not n.startswith(SYSTEM))
    # Unversioned symbols name no library: every stub defines them (the loader takes the first).
    loose = sorted((b, k) for (b, v), k in wanted.items() if not v and b not in defined)
    os.makedirs(out, exist_ok=True)
    for soname in missing:
        versioned: dict[str, list[tuple[str, str]]] = {}
        for (base, version), kind in sorted(wanted.items()):
            if version and owners.get(version) == soname:
                versioned.setdefault(version, []).append((base, kind))
        names = {b for group in versioned.values() for b, _ in group}
        build(soname, versioned, [x for x in loose if x[0] not in names], out)
    with open(os.path.join(out, "CUDA_STUBS.txt"), "w", encoding="ascii") as handle:
        handle.write("Loader-only stubs made by scripts/cuda_stubs.py (not NVIDIA's "
                     "libraries):\n" + "\n".join(missing) + "\n")
    print(f"{len(missing)} stub libraries in {out}: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    real = set(sys.argv[3].split(",")) if len(sys.argv) > 3 and sys.argv[3] else set()
    sys.exit(main(sys.argv[1], sys.argv[2], real))
