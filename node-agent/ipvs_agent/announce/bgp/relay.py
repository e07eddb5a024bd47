"""ExaBGP's helper process: copies lines between ExaBGP and the agent.

ExaBGP talks to its API helpers over their standard input and output, and starts them itself;
the agent, which starts ExaBGP, listens on a Unix socket that this helper connects to. Run as
a script (``python -I relay.py SOCKET``), it imports nothing of the agent, so it starts fast.
It exits when either side closes, and ExaBGP then stops announcing for it.
"""

import os
import select
import socket
import sys


def main() -> int:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(sys.argv[1])
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    while True:
        ready, _, _ = select.select([stdin, conn], [], [])
        if stdin in ready:  # ExaBGP's acknowledgements and session changes -> the agent
            data = os.read(stdin, 65536)
            if not data:
                return 0
            conn.sendall(data)
        if conn in ready:  # the agent's commands -> ExaBGP
            data = conn.recv(65536)
            if not data:
                return 0
            view = memoryview(data)
            while view:
                view = view[os.write(stdout, view) :]


if __name__ == "__main__":
    sys.exit(main())
