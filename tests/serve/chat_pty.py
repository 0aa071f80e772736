"""Drives the interactive chat (`sirius-offload --model M` on a terminal) through a
pseudo-terminal: two turns (the second reuses the first's prompt), Ctrl-C stopping an answer
without ending the program, then /exit.

    python3 tests/serve/chat_pty.py BINARY MODEL_DIR
"""

import os
import pty
import re
import select
import sys
import time


def main():
    binary, model = sys.argv[1], sys.argv[2]
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(binary, [binary, "--model", model, "--no-fetch", "--max-tokens", "300",
                          "--temperature", "0"])
    seen = ""

    def read_until(pattern, timeout=120):
        nonlocal seen
        deadline = time.time() + timeout
        while not re.search(pattern, seen):
            left = deadline - time.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; the terminal shows:\n{seen}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                try:
                    data = os.read(fd, 4096).decode(errors="replace")
                except OSError:
                    raise AssertionError(f"the chat ended early; the terminal shows:\n{seen}")
                seen += data
        start = re.search(pattern, seen).end()
        out, seen = seen[:start], seen[start:]
        return out

    def say(line):
        os.write(fd, line.encode() + b"\r")

    read_until(r"\n> ")
    say("What is the capital of France?")
    first = read_until(r"\n> ")
    assert "Paris" in first, first
    m = re.search(r"\[(\d+) prompt tokens \((\d+) reused\)", first)
    assert m and m.group(2) == "0", first
    first_prompt = int(m.group(1))
    say("And of Italy?")
    second = read_until(r"\n> ")
    m = re.search(r"\[(\d+) prompt tokens \((\d+) reused\)", second)
    assert m and int(m.group(2)) >= first_prompt, f"the second turn should reuse the first's {first_prompt} prompt tokens: {second}"
    say("Write a very long story about a dragon who learns to fly.")
    read_until(r"learns to fly\.\r?\n")  # the terminal's echo of the line
    read_until(r"\w+ \w+ \w+")  # some of the answer
    os.write(fd, b"\x03")  # Ctrl-C
    stopped = read_until(r"\n> ")
    assert "[stopped]" in stopped, stopped
    say("/exit")
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"exit status {status}"
    print("ok (chat): two turns, the second reusing", first_prompt, "prompt tokens; Ctrl-C stopped an answer")


if __name__ == "__main__":
    main()
