"""The trust policy over random layouts of seals (red team trust_mixmatch_1/2).

Each scenario builds nested folders of pickles, seals folders and single files
(with the trusted key or a stranger's, each seal a new version, a folder's
seal sometimes leaving one file out), then does
what an attacker without the key can: swaps bytes between files, rolls a file
back to older bytes, copies a file's ``.sig`` beside another file, copies a
folder's ``model.sig`` into another folder, deletes a seal (so that a farther,
older one decides: only the policy's ``min_version`` can tell), and at the end may replace a file
by a link to another.  The expected verdict of every load is decided from the
scenario's own record of what each seal signed, never by asking trainguard:
a file loads iff every seal that covers it (``FILE.sig``, ``model.sig`` in its
folder or any above that does not leave it out, for the path as given and as
resolved) was made by the
trusted key and signed exactly these bytes under this name, and the most
specific one is at least the policy's minimum version.

The files are plain pickles of a token (nothing to fire), loaded with the safe
loader; the seed is printed and a fresh one is drawn each run.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import trainguard
from trainguard.errors import UnsafeModelError
from trainguard.loader.trust import load_trust
from trainguard.signing import seal
from trainguard.signing.keys import write_keypair

SCENARIOS = 25


@dataclass(frozen=True)
class Signed:
    """What one seal vouches for: sealed-root-relative names -> bytes."""

    trusted: bool
    version: int
    content: dict[str, bytes]
    name: str | None  # a single-file seal: the file's name
    ignored: frozenset[str] = frozenset()  # left out by the signer: not covered


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


class Scenario:
    def __init__(self, rng: random.Random, root: Path, keys: dict[bool, Path]) -> None:
        self.rng, self.root, self.keys = rng, root, keys
        self.folders = [root]
        for _ in range(rng.randint(1, 4)):
            parent = rng.choice(self.folders)
            child = parent / f"d{len(self.folders)}"
            child.mkdir()
            self.folders.append(child)
        self.files = [rng.choice(self.folders) / f"f{i}.pkl" for i in range(rng.randint(2, 5))]
        self.history: dict[Path, list[bytes]] = {}
        for f in self.files:
            self.write(f, self.token())
        self.seals: dict[Path, Signed] = {}  # signature path -> what it vouches for
        self.version = 0
        self.log: list[str] = []

    def token(self) -> bytes:
        return pickle.dumps({"token": self.rng.getrandbits(64)})

    def write(self, path: Path, data: bytes) -> None:
        path.write_bytes(data)
        self.history.setdefault(path, []).append(data)

    def step(self) -> None:
        rng = self.rng
        op = rng.choice(
            [
                "seal_dir",
                "seal_file",
                "edit",
                "swap",
                "rollback",
                "copy_sig",
                "copy_dir_sig",
                "delete_sig",
            ]
        )
        self.log.append(op)
        trusted = rng.random() < 0.8
        if op == "seal_dir":
            folder = rng.choice(self.folders)
            self.version += 1
            inside = [f.relative_to(folder).as_posix() for f in self.files if folder in f.parents]
            ignored = frozenset(rng.sample(inside, 1) if inside and rng.random() < 0.3 else [])
            seal(
                folder,
                self.keys[trusted],
                version=str(self.version),
                cache=False,
                ignore=sorted(ignored),
            )
            content = {r: (folder / r).read_bytes() for r in inside if r not in ignored}
            signed = Signed(trusted, self.version, content, None, ignored)
            self.seals[folder / "model.sig"] = signed
        elif op == "seal_file":
            f = rng.choice(self.files)
            self.version += 1
            seal(f, self.keys[trusted], version=str(self.version), cache=False)
            self.seals[sig_of(f)] = Signed(trusted, self.version, {".": f.read_bytes()}, f.name)
        elif op == "edit":
            self.write(rng.choice(self.files), self.token())
        elif op == "swap":
            a, b = rng.sample(self.files, 2)
            self.write(a, b.read_bytes())
        elif op == "rollback":
            f = rng.choice(self.files)
            self.write(f, rng.choice(self.history[f]))
        elif op == "copy_sig":
            singles = [s for s, v in self.seals.items() if v.name is not None]
            if singles:
                src, dst = rng.choice(singles), sig_of(rng.choice(self.files))
                if src != dst:
                    shutil.copyfile(src, dst)
                    self.seals[dst] = self.seals[src]
        elif op == "delete_sig":
            if self.seals:
                gone = rng.choice(sorted(self.seals))
                gone.unlink()
                del self.seals[gone]
        else:
            folder_sigs = [s for s, v in self.seals.items() if v.name is None]
            if folder_sigs:
                src, dst = rng.choice(folder_sigs), rng.choice(self.folders) / "model.sig"
                if src != dst:
                    shutil.copyfile(src, dst)
                    self.seals[dst] = self.seals[src]

    def link_one(self) -> None:
        """Replace a file by a link to another (after the last seal: seal refuses links)."""
        a, b = self.rng.sample(self.files, 2)
        a.unlink()
        a.symlink_to(b)
        self.log.append(f"link {a.name}->{b.name}")

    def expected(self, path: Path, minimum: int | None) -> bool:
        """Loads iff every covering seal vouches for these bytes under this name."""
        data = path.read_bytes()
        views = list(dict.fromkeys([path, Path(os.path.realpath(path))]))
        # (specificity, the seal, the name it must list, the file name it must bind)
        covering: list[tuple[int, Signed, str, str | None]] = []
        for view in views:
            if sig_of(view) in self.seals:
                covering.append((len(view.parts) + 1, self.seals[sig_of(view)], ".", view.name))
            for folder in view.parents:
                signed = self.seals.get(folder / "model.sig")
                rel = view.relative_to(folder).as_posix()
                # An untrusted seal's ignores cannot be believed: it covers all below.
                if signed is not None and (rel not in signed.ignored or not signed.trusted):
                    covering.append((len(folder.parts), signed, rel, None))
        if not covering:
            return False
        for _, signed, rel, name in covering:
            if not signed.trusted or signed.content.get(rel) != data or signed.name != name:
                return False
        deciding = max(covering, key=lambda c: c[0])[1]
        return minimum is None or deciding.version >= minimum


def sig_of(path: Path) -> Path:
    return path.with_name(path.name + ".sig")


def test_random_layouts_load_iff_every_covering_seal_vouches(tmp_path: Path) -> None:
    seed = int(os.environ.get("TG_TRUST_SEED") or random.SystemRandom().randrange(2**32))
    print(f"trust layouts seed {seed} (TG_TRUST_SEED={seed} replays it)")
    rng = random.Random(seed)
    trusted, other = write_keypair(tmp_path / "trusted"), write_keypair(tmp_path / "other")
    keys = {True: trusted[0], False: other[0]}
    outcomes = {True: 0, False: 0}
    for n in range(SCENARIOS):
        root = tmp_path / f"s{n}" / "r"
        root.mkdir(parents=True)
        scenario = Scenario(rng, root, keys)
        for _ in range(rng.randint(2, 8)):
            scenario.step()
        if rng.random() < 0.2:
            scenario.link_one()
        minimum = rng.choice([None, None, max(1, scenario.version - 1)])
        policy_file = root.parent / "trust.toml"
        expect = f'min_version = "{minimum}"\n' if minimum is not None else ""
        policy_file.write_text(f'[trust]\nkeys = ["{trusted[1]}"]\n{expect}')
        policy = load_trust(policy_file)
        for f in scenario.files:
            want = scenario.expected(f, minimum)
            why = None
            try:
                trainguard.load(f, trust=policy)
                got = True
            except UnsafeModelError as exc:
                got, why = False, exc
            assert got == want, (
                f"seed {seed} scenario {n} {f.relative_to(root)}: {scenario.log} {why}"
            )
            outcomes[got] += 1
    # Both verdicts occur in a run, so neither side of the invariant is vacuous.
    assert outcomes[True] and outcomes[False], outcomes
