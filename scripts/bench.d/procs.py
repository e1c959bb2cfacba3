"""The processes under test and what /proc says about them: free loopback
ports, starting nginx and the gateway in their own temporary directories,
CPU time, peak RSS, and stopping everything that was started."""

import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(Exception):
    """A process under test did not come up; the message says why."""


class PortClash(StartError):
    """A port picked as free was taken before the process bound it."""


def free_ports(count):
    """Ports the kernel hands out as free on 127.0.0.1. Bound together so they
    differ, then released for the process that will use them; a clash in
    between (someone else took one) is detected at start-up and retried."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def accepts(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_listening(proc, ports, timeout, describe):
    """Waits until every port accepts a connection; fails early when the
    process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise StartError(f"{describe} exited with status {proc.returncode} during start-up")
        if all(accepts(port) for port in ports):
            return
        if time.monotonic() > deadline:
            raise StartError(f"{describe} did not listen on {ports} within {timeout}s")
        time.sleep(0.05)


def cpu_ticks(pid):
    """utime + stime of a process (all its threads, living and exited), in
    clock ticks; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def status_kb(pid, key):
    """A `kB` value of /proc/<pid>/status (VmHWM, VmRSS), or None."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^" + key + r":\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def children(pid):
    """Direct children of a process, from every /proc/<pid>/stat's ppid."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def machine_ticks():
    """(busy, steal, total) clock ticks of all CPUs since boot, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def listen_overflows():
    """The kernel's count of connections dropped because a listen queue was
    full (TcpExt ListenOverflows, whole machine), or None."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None


def listen_backlog(port):
    """The backlog of the socket listening on 127.0.0.1:port (`ss` shows it
    as Send-Q), or None when ss is missing."""
    if not shutil.which("ss"):
        return None
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=False).stdout
    fields = out.split()
    return int(fields[2]) if len(fields) >= 3 and fields[2].isdigit() else None


def nginx_version():
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out.stderr + out.stdout)
    if not match:
        raise StartError(f"cannot read the nginx version from `nginx -v`: {out.stderr.strip()}")
    return tuple(int(v) for v in match.groups())


class Service:
    """A started process with its temporary directory; `stop()` ends it and
    whatever it forked, by pid."""

    def __init__(self, name, proc, directory, ports):
        self.name = name
        self.proc = proc
        self.dir = Path(directory)
        self.ports = ports
        self.known_children = []

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc.poll() is None

    def pids(self):
        """The process and its children (nginx: master and workers)."""
        self.known_children = children(self.pid)
        return [self.pid] + self.known_children

    def cpu_ticks(self):
        """Summed over the process and its children; None when one is gone."""
        total = 0
        for pid in self.pids():
            ticks = cpu_ticks(pid)
            if ticks is None:
                return None
            total += ticks
        return total

    def peak_rss_kb(self):
        """VmHWM summed over the process and its children: for nginx an upper
        bound of the memory it held at once (master and worker peaks need not
        coincide)."""
        values = [status_kb(pid, "VmHWM") for pid in self.pids()]
        return sum(v for v in values if v is not None) if values else None

    def stop(self, signum=signal.SIGTERM, grace=15.0):
        forked = list(self.known_children)
        if self.alive():
            forked = children(self.pid) or forked
            try:
                self.proc.send_signal(signum)
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # nginx workers outlive a killed master; end the ones we saw, by pid,
        # if they are still nginx processes of ours.
        for pid in forked:
            try:
                if self.name_of(pid) == "nginx":
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    @staticmethod
    def name_of(pid):
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return None

    def remove_dir(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def start_nginx(name, template, values_for_ports, port_count, version, attempts=5):
    """Renders `template` with fresh ports and starts nginx in the foreground
    (daemon off) in its own temporary directory. `values_for_ports(ports)`
    gives the @PLACEHOLDER@ values; ports[0] must be the status port."""
    last_error = None
    for _ in range(attempts):
        directory = tempfile.mkdtemp(prefix=f"gormic-bench-{name}-")
        # Workers drop root privileges (to nobody): they must reach the
        # directory that holds their temp paths.
        os.chmod(directory, 0o755)
        ports = free_ports(port_count)
        values = values_for_ports(ports)
        values["DIR"] = directory
        if version >= (1, 25, 1):
            values["H2_LISTEN_FLAG"], values["HTTP2_ON"] = "", "http2 on;"
        else:
            # Before 1.25.1: `http2` on the listen line, h2c with prior
            # knowledge only (no HTTP/1.1 on that port).
            values["H2_LISTEN_FLAG"], values["HTTP2_ON"] = "http2", ""
        text = Path(template).read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", str(value))
        leftover = re.findall(r"@[A-Z0-9_]+@", text.replace("@...@", ""))
        if leftover:
            shutil.rmtree(directory, ignore_errors=True)
            raise StartError(f"{template}: placeholders without a value: {sorted(set(leftover))}")
        conf = Path(directory) / "nginx.conf"
        conf.write_text(text)
        error_log = Path(directory) / "error.log"
        proc = subprocess.Popen(
            ["nginx", "-p", directory, "-c", str(conf), "-e", str(error_log)],
            stdout=subprocess.DEVNULL,
            stderr=open(Path(directory) / "stderr.log", "wb"),
            start_new_session=True,
        )
        service = Service(name, proc, directory, ports)
        try:
            wait_listening(proc, ports, 15, f"nginx ({name})")
            return service
        except StartError as error:
            service.stop()
            log = ""
            for path in (error_log, Path(directory) / "stderr.log"):
                if path.exists():
                    log += path.read_text(errors="replace")
            last_error = StartError(f"{error}: {log.strip()[-2000:]}")
            service.remove_dir()
            if "Address already in use" not in log:
                raise last_error
    raise last_error


def start_gateway(binary, upstream_url, extra_args, admin_flag, log_path, attempts=5):
    """Starts the gateway with its default flags apart from the listen address,
    the upstream and (when the binary has one) a free admin port. Its stderr,
    the per-call log, goes to `log_path` opened for appending, so the harness
    may truncate the file between runs. GORMIC_* variables are dropped from
    its environment so that nothing but the defaults applies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GORMIC_") and k != "OTEL_EXPORTER_OTLP_ENDPOINT"}
    last_error = None
    for _ in range(attempts):
        directory = tempfile.mkdtemp(prefix="gormic-bench-gateway-")
        ports = free_ports(2 if admin_flag else 1)
        args = [str(binary), "--listen", f"127.0.0.1:{ports[0]}", "--upstream", upstream_url]
        if admin_flag:
            args += ["--admin-listen", f"127.0.0.1:{ports[1]}"]
        args += list(extra_args)
        log = open(log_path, "ab")
        proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=directory, start_new_session=True
        )
        log.close()
        service = Service("gateway", proc, directory, ports)
        service.args = args
        try:
            wait_listening(proc, ports, 30, "gormic-gateway")
            if admin_flag:
                wait_http(f"http://127.0.0.1:{ports[1]}/metrics", proc, 15)
            return service
        except StartError as error:
            service.stop()
            service.remove_dir()
            text = Path(log_path).read_text(errors="replace")[-3000:]
            last_error = StartError(f"{error}; its output:\n{text}")
            if "in use" not in text:
                raise last_error
    raise last_error


def wait_http(url, proc, timeout):
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                answer.read()
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise StartError(f"gormic-gateway exited with status {proc.returncode} during start-up")
        if time.monotonic() > deadline:
            raise StartError(f"{url} did not answer within {timeout}s")
        time.sleep(0.05)


def http_get(port, path):
    """A plain HTTP/1.1 GET on loopback (stub_status, /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.read().decode()


def stub_requests(port):
    """nginx's `requests` counter; the read itself is counted (+1)."""
    text = http_get(port, "/stub_status")
    match = re.search(r"server accepts handled requests\s+(\d+)\s+(\d+)\s+(\d+)", text)
    if not match:
        raise ValueError(f"unexpected stub_status answer: {text!r}")
    return int(match.group(3))


def command_output(cmd, cwd):
    """A command's stdout and stderr, or why it could not run."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=cwd)
        return (done.stdout + done.stderr).strip()
    except OSError as error:
        return f"? ({error})"


def machine_info(root, gateway_bin):
    """The machine, tools and build a result was measured with (bench and
    limits reports)."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    flags = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    kinds = []
    if shutil.which("systemd-detect-virt"):
        for option, what in (("--vm", "VM"), ("--container", "container")):
            found = subprocess.run(["systemd-detect-virt", option], capture_output=True, text=True, check=False)
            if found.stdout.strip() not in ("", "none"):
                kinds.append(f"{found.stdout.strip()} {what}")
    if not any(k.endswith("VM") for k in kinds) and " hypervisor" in flags:
        kinds.insert(0, "VM (hypervisor flag in /proc/cpuinfo)")
    virt = ", ".join(kinds) or "none detected"
    mem = next((line.split(":", 1)[1].strip() for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "?")

    def output(cmd):
        return command_output(cmd, root)

    status = output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "virtualization": virt,
        "memory": mem,
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "h2load": output(["h2load", "--version"]),
        "python": platform.python_version(),
        "gateway_version": output([str(gateway_bin), "--version"]),
        "git_commit": output(["git", "rev-parse", "HEAD"]),
        "git_branch": output(["git", "rev-parse", "--abbrev-ref", "HEAD"]),
        "git_dirty": bool(status) and not status.startswith("fatal"),
    }
