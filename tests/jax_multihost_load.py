"""Run by tests/test_jax_multihost.py as each process of a 2-process JAX job (2 forced host
devices each): loads FOLDER over a tp=4 mesh through the library, counting the bytes each
process reads from the checkpoint per tensor, and prints {"process": i, "read": {name: bytes}}
as its last stdout line (process 1 before it starts following process 0).

`python tests/jax_multihost_load.py FOLDER COORDINATOR PROCESS_ID`
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict


def main() -> None:
    folder, coordinator, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from entropix.backends.jax import multihost
    from entropix.io import checkpoint
    from entropix.loading import load_jax_multihost

    read: dict[str, int] = defaultdict(int)
    for cls in {type(c) for c in [checkpoint.open_path(__import__("pathlib").Path(folder))]}:
        whole, part = cls.read, cls.read_slice

        def read_whole(self, name, _whole=whole):
            t = _whole(self, name)
            read[name] += t.array.nbytes
            return t

        def read_part(self, name, dim, lo, hi, _part=part):
            t = _part(self, name, dim, lo, hi)
            read[name] += t.array.nbytes
            return t

        cls.read, cls.read_slice = read_whole, read_part
    following = multihost.follow

    def report_then_follow(model, link):
        print(json.dumps({"process": pid, "read": dict(read)}), flush=True)
        return following(model, link)

    multihost.follow = report_then_follow
    lm = load_jax_multihost(folder, 4, 1, device="cpu", dtype="float32",
                            cluster=multihost.Cluster(coordinator, 2, pid), peer_timeout=30)
    print(json.dumps({"process": pid, "read": dict(read)}), flush=True)
    lm.close()


if __name__ == "__main__":
    main()
