"""The registry of rule ids.  Ids are stable: users suppress them by name.

``docs/rules.md`` is generated from this table (``python -m trainguard rules
--markdown``) and a test keeps the two in step.
"""

from __future__ import annotations

from trainguard.findings import Finding, Rule, Severity

_C, _H, _M, _L, _I = (
    Severity.CRITICAL,
    Severity.HIGH,
    Severity.MEDIUM,
    Severity.LOW,
    Severity.INFO,
)

RULES: dict[str, Rule] = {
    r.id: r
    for r in (
        # -- files ----------------------------------------------------------
        Rule(
            "TG001",
            "unknown-format",
            _I,
            "The file's content matches no format trainguard understands, and no pickle "
            "loader (pickle, torch, joblib, numpy) would accept it: the symbolic machine "
            "saw it fail before importing anything. It was not analysed further.",
        ),
        Rule(
            "TG002",
            "scan-limit",
            _H,
            "A safety limit (size, depth, count or time) stopped the analysis before "
            "the end of the data. What follows the limit was not checked, so the "
            "file cannot be called safe; raise the limit only for a file you trust.",
        ),
        Rule(
            "TG003",
            "unreadable",
            _H,
            "The data could not be read or parsed as the format it claims to be. A "
            "lenient loader may still execute part of it; treat it as unsafe.",
        ),
        Rule(
            "TG004",
            "parser-crashed",
            _C,
            "A native parser (libhdf5, for HDF5 files) crashed, hung or ran out of "
            "memory on this file in trainguard's isolated child process. The file is "
            "malformed in a way that breaks the library every loader of this format "
            "uses: loading it may crash the job or worse. Do not load it.",
        ),
        Rule(
            "TG005",
            "empty-file",
            _L,
            "The file is empty (0 bytes). No loader can read a model from it: most often "
            "a download or copy that did not finish, or a writer that crashed. Nothing to "
            "execute, but the job that loads it will fail.",
        ),
        # -- pickle ---------------------------------------------------------
        Rule(
            "TG101",
            "pickle-dangerous-global",
            _C,
            "The pickle imports a callable that can run code, touch files, start "
            "processes, reach the network or import modules. Loading it with "
            "pickle/torch.load(weights_only=False) runs the attacker's code. Do not "
            "load it; use `trainguard.load` or ask the publisher for safetensors.",
        ),
        Rule(
            "TG102",
            "pickle-stdlib-gadget",
            _H,
            "The pickle imports a standard-library function or class that is not on "
            "the allowlist. Attackers use obscure stdlib helpers (uuid, imaplib, "
            "logging, ...) to run commands while evading denylists.",
        ),
        Rule(
            "TG103",
            "pickle-imports-code",
            _M,
            "Loading this file imports and instantiates the named class or function. "
            "Common for whole nn.Module pickles, scikit-learn estimators or training "
            "arguments; trust it only if you trust the file's author, or allow the "
            "global in a policy.",
        ),
        Rule(
            "TG104",
            "pickle-dynamic-call",
            _C,
            "The pickle calls something it computed at load time (a call's result, or "
            "a module/name built on the stack) rather than a plain import. Benign "
            "checkpoints never do this; it is how payloads hide from scanners.",
        ),
        Rule(
            "TG105",
            "pickle-tamper-on-load",
            _C,
            "The pickle mutates objects while it loads (in-place tensor ops, "
            "attribute writes on classes or modules): the Sleepy Pickle technique, "
            "which alters a model's weights or code and leaves a clean-looking file.",
        ),
        Rule(
            "TG106",
            "pickle-extension-code",
            _H,
            "The pickle uses the copyreg extension registry (EXT1/EXT2/EXT4), which "
            "resolves to a callable chosen by the loading process. The scanner cannot "
            "know what it calls.",
        ),
        Rule(
            "TG107",
            "pickle-malformed",
            _M,
            "The pickle stream is broken (truncated, invalid opcode or inconsistent "
            "stack). A loader runs everything before the break and then fails; what "
            "came before the break was analysed and is reported separately.",
        ),
        Rule(
            "TG108",
            "pickle-trailing-data",
            _L,
            "Bytes follow the pickle's STOP opcode and are not another pickle. Loaders "
            "ignore them, but they can hide a second payload for a custom reader.",
        ),
        Rule(
            "TG109",
            "pickle-persistent-id",
            _L,
            "The pickle refers to objects by persistent id outside a PyTorch "
            "checkpoint; what they resolve to depends on the loading code.",
        ),
        Rule(
            "TG110",
            "pickle-nested",
            _H,
            "The pickle carries a byte string that is itself a pickle with findings "
            "(reported with the nested offset). A nested pickle.loads would run it.",
        ),
        Rule(
            "TG111",
            "pickle-polyglot",
            _H,
            "The file parses as another format (a tar, HDF5, GGUF, safetensors...) and is "
            "also a pickle stream that pickle.load or a legacy torch.load executes from "
            "its first byte. No honest file is both; the pickle's own findings follow.",
        ),
        Rule(
            "TG112",
            "pickle-calls-unknown",
            _H,
            "The pickle calls (REDUCE, INST, OBJ, NEWOBJ_EX, or BUILD with a state only a "
            "custom __setstate__ takes) a global that is not known to be safe to call: the "
            "call runs it with arguments the file chooses. Expression "
            "evaluators, test helpers that run scripts and decoders that unpickle their "
            "input are ordinary third-party functions. Merely constructing a class (NEWOBJ, "
            "copyreg's reconstructor) stays TG103; allow the global in a policy if you "
            "trust it.",
        ),
        # -- containers -----------------------------------------------------
        Rule(
            "TG113",
            "torchscript-code",
            _C,
            "A TorchScript archive's code calls an operator that reads, maps or writes "
            "files (critical) or a custom operator namespace whose native code comes from "
            "a library the loading process imported (high); a __setstate__ that "
            "torch.jit.load runs while loading is listed as low. TorchScript cannot import "
            "or eval, so its operators are what it can do.",
        ),
        Rule(
            "TG114",
            "package-code",
            _H,
            "A torch.package archive ships Python modules, which PackageImporter imports "
            "(running their code) when load_pickle or import_module reaches them: high unless "
            "a policy trusts the archive, critical when a module reaches exec/eval, the "
            "operating system, file writes or the network. Read with ast, never imported.",
        ),
        Rule(
            "TG201",
            "zip-crc-mismatch",
            _M,
            "A zip member's CRC does not match its data. PyTorch loads such files "
            "while Python's zipfile refuses them, which has blinded scanners "
            "(picklescan CVE-2025-10156).",
        ),
        Rule(
            "TG202",
            "zip-name-mismatch",
            _H,
            "A zip member's local header names a different file than the central "
            "directory. Readers disagree about which member is which, an evasion "
            "used against scanners (picklescan CVE-2025-1944).",
        ),
        Rule(
            "TG203",
            "zip-flag-bits",
            _M,
            "A zip member sets unusual general-purpose flag bits (e.g. encryption) "
            "that PyTorch ignores but other readers refuse (picklescan CVE-2025-1945).",
        ),
        Rule(
            "TG204",
            "zip-duplicate-name",
            _H,
            "Two zip members share a name; readers pick different ones.",
        ),
        Rule(
            "TG205",
            "archive-too-deep",
            _H,
            "Archives are nested deeper than the limit; the innermost ones were not scanned.",
        ),
        Rule(
            "TG206",
            "archive-bomb",
            _H,
            "A member decompresses past the size or ratio limit (a decompression "
            "bomb); the rest of it was not scanned.",
        ),
        Rule(
            "TG207",
            "archive-path-escape",
            _H,
            "An archive member's path is absolute or climbs out of the extraction "
            "folder (zip-slip), or is a link pointing outside it.",
        ),
        Rule(
            "TG208",
            "archive-not-inspected",
            _H,
            "The archive could not be opened for inspection (its format needs an "
            "optional extra that is not installed, or it is encrypted). Its content "
            "is unknown, so it is not reported as clean.",
        ),
        Rule(
            "TG209",
            "archive-too-many-members",
            _H,
            "The archive holds more members than the limit; the rest were not scanned.",
        ),
        Rule(
            "TG210",
            "zip-ambiguous",
            _H,
            "The zip's structure lets two readers see different content (several end "
            "records or central directories, hidden or overlapping entries, data in "
            "front of the archive). Scanners have been evaded this way; the members "
            "every reader could see were all scanned.",
        ),
        Rule(
            "TG211",
            "zip-irregular",
            _L,
            "The zip is damaged or unusual (sizes that disagree, unreferenced or "
            "trailing bytes, a missing central directory) but nothing suggests two "
            "readers would disagree about its content.",
        ),
        # -- numpy ----------------------------------------------------------
        Rule(
            "TG301",
            "numpy-object-array",
            _L,
            "A .npy array of Python objects: numpy.load needs allow_pickle=True, which "
            "unpickles the embedded stream (analysed and reported separately).",
        ),
        Rule(
            "TG302",
            "numpy-bad-header",
            _M,
            "The .npy header is malformed or inconsistent with the file size.",
        ),
        # -- load: safe loading and the sandbox (TG4xx) ------------------------
        Rule(
            "TG401",
            "load-refused-global",
            _H,
            "The safe loader met an import outside its allowlist while rebuilding the "
            "file. It has its own implementation for every allowed import; anything else "
            "would run code from the file's author. Allow it in a policy only if you "
            "trust that author.",
        ),
        Rule(
            "TG402",
            "load-bad-tensor",
            _C,
            "A tensor's size, stride or offset reaches outside its storage, or its "
            "storage is shorter than declared. Loaders that trust these numbers read or "
            "write out of bounds (CVE-2026-24747).",
        ),
        Rule(
            "TG403",
            "sandbox-blocked",
            _C,
            "While a guarded load ran, code tried to start a process, run or compile "
            "code, import a new module, open a network connection or write a file. The "
            "sandbox refused it; the file carries a payload.",
        ),
        # -- ledger (TG12xx) ---------------------------------------------------
        Rule(
            "TG1201",
            "ledger-record-modified",
            _C,
            "A ledger record does not hash to the digest it was written with: its content "
            "(payload, kind, step, time or stream) was edited in the database afterwards, "
            "or cannot be read back. Nothing it says can be trusted.",
        ),
        Rule(
            "TG1202",
            "ledger-record-missing",
            _C,
            "Records are missing from a ledger stream (a gap in its sequence numbers, or a "
            "registered stream with no records): they were deleted. The evidence gives the "
            "missing range.",
        ),
        Rule(
            "TG1203",
            "ledger-chain-broken",
            _C,
            "A ledger record does not carry the digest of the record before it: a record "
            "was replaced, inserted, or the chain was rewritten from that point on.",
        ),
        Rule(
            "TG1204",
            "ledger-record-reordered",
            _C,
            "A ledger record is intact but sits at another sequence number than the one it "
            "was written with: records were swapped or moved.",
        ),
        Rule(
            "TG1205",
            "ledger-truncated",
            _C,
            "A signed head says a stream reached a sequence number that the ledger no longer "
            "holds: records were cut off the end of the stream (or the whole stream was "
            "deleted).",
        ),
        Rule(
            "TG1206",
            "ledger-head-mismatch",
            _C,
            "A signed head names a record by a digest that differs from the record stored "
            "there now: the chain up to it was rewritten (and re-hashed) after it was signed.",
        ),
        Rule(
            "TG1207",
            "ledger-head-signature-invalid",
            _C,
            "A signed head of the ledger does not verify with the given public key, is "
            "malformed, carries no signature, or signs a record other than the one before "
            "it (copied from another run or stream).",
        ),
        Rule(
            "TG1208",
            "ledger-unsigned-tail",
            _I,
            "Records written after the stream's last signed head. The hash chain shows they "
            "were not edited, but nothing proves they were not rewritten or cut short; sign "
            "heads more often, and at the end of the run.",
        ),
        Rule(
            "TG1209",
            "ledger-unsigned",
            _H,
            "A public key was given but no head of the run is signed by it: none of the "
            "run's records can be authenticated, and a rewritten ledger would look intact.",
        ),
        Rule(
            "TG1210",
            "ledger-run-unsigned",
            _M,
            "The run carries no run key and no signed head: its records are chained but "
            "nothing authenticates them, so whoever can write the database can rewrite the "
            "run whole (watch(sign_key=False), a ledger from before signing, or run-start "
            "records rewritten to drop their keys). Pin the key with --expect-key-id.",
        ),
        Rule(
            "TG1211",
            "ledger-run-not-ended",
            _H,
            "A rank's stream of a signed run has no run-end record: the run is still running "
            "(verify it with --live), the rank was killed, or the stream was cut back, for "
            "instance to an earlier signed head. A rank that a surviving rank reported as "
            "stopped is explained at medium severity, when the survivor's run key is anchored "
            "(pinned, or vouched for by rank 0); a report by a stream nothing anchors explains "
            "nothing.",
        ),
        Rule(
            "TG1212",
            "ledger-final-head-missing",
            _H,
            "A stream of a signed run does not end with a head signed by its run key after "
            "its run-end (or run-summary) record, or the run's final head does not name every "
            "rank's stream: the end of the stream was cut or rewritten.",
        ),
        Rule(
            "TG1213",
            "ledger-run-key-unexpected",
            _C,
            "A stream's run key is not one of the key ids pinned (--expect-key-id, or rank "
            "0's from the anchor file watch wrote at start), or a pinned stream carries no run "
            "key, or one the anchor recorded as unsigned now does: the stream was rewritten "
            "whole with a new key (or without one). High, not critical, for a rank whose key "
            "rank 0 could not vouch for because rank 0 died before writing its final run head.",
        ),
        Rule(
            "TG1214",
            "ledger-stream-foreign",
            _H,
            "A stream that is no rank of the run: numbered at or above the world size rank "
            "0's run-start gives, or claiming a world size over the verifier's cap. Someone "
            "other than the run added it; what it says is not taken.",
        ),
        Rule(
            "TG1215",
            "ledger-step-records-gap",
            _H,
            "A rank's step records do not run 0, 1, 2, ... once each up to its run-end's "
            "step count: records were dropped, repeated or renumbered before they were "
            "chained (a guard writes one step record per step, in order, from 0), so the "
            "chain and its signatures vouch for a history with steps missing.",
        ),
        Rule(
            "TG1216",
            "ledger-anchor-unreadable",
            _H,
            "The anchor file (rank 0's run key id, written by watch at start outside the "
            "ledger) cannot be used: unreadable, over its size or line cap, not a regular "
            "file, or owned or writable by someone else, so the run's key is not pinned from "
            "it. Medium when only some of its lines are no anchor entry (one may have been "
            "this run's).",
        ),
        # -- watch: the training monitor (TG13xx) ------------------------------
        Rule(
            "TG1301",
            "weights-changed-outside-step",
            _C,
            "Parameters changed between two optimizer steps: something other than the "
            "optimizer wrote to the weights (injected code, a Sleepy Pickle payload, a "
            "tampering rank). The evidence names the tensors.",
        ),
        Rule(
            "TG1302",
            "optimizer-state-changed-outside-step",
            _C,
            "The optimizer's state (moments, momentum buffers, step counters) changed "
            "between two steps, outside optimizer.step().",
        ),
        Rule(
            "TG1303",
            "hyperparameter-drift",
            _H,
            "An optimizer hyper-parameter changed between steps and the registered "
            "scheduler does not explain it (learning rate, betas, eps, weight decay, "
            "momentum, or a new key).",
        ),
        Rule(
            "TG1304",
            "code-identity-changed",
            _C,
            "The code of optimizer.step, clip_grad_norm_, the seeding functions, the data "
            "loader's iteration, or the global optimizer/module hook registries differs "
            "from the start of the run: the training code was patched at run time.",
        ),
        Rule(
            "TG1305",
            "random-state-reseeded",
            _H,
            "A random generator was re-seeded or its state replaced mid-run (torch's "
            "initial seed changed, a seeding function was called, or a state repeated "
            "an earlier one).",
        ),
        Rule(
            "TG1306",
            "update-direction",
            _C,
            "An update contradicts the gradient: gradients changed sign between backward "
            "and the optimizer step (a flipped clipping), or the parameter change points "
            "against the direction the optimizer's own state prescribes.",
        ),
        Rule(
            "TG1307",
            "step-time-anomaly",
            _M,
            "A step took far longer than this rank's recent steps (robust statistics): "
            "random sleeps, a straggler, or contention. High when it keeps happening.",
        ),
        Rule(
            "TG1308",
            "loss-or-grad-spike",
            _L,
            "The loss or the gradient norm jumped far outside its recent range.",
        ),
        Rule(
            "TG1309",
            "data-tampering",
            _H,
            "A sample came back with different content than the last time the same "
            "index was loaded (static data check), or a batch differs from the one "
            "recorded for the same step of a reference run.",
        ),
        Rule(
            "TG1310",
            "rank-disagreement",
            _C,
            "Ranks that should hold identical parameters (data parallel) do not; the "
            "ranks outside the majority are named.",
        ),
        Rule(
            "TG1311",
            "rank-stopped",
            _H,
            "A rank died or stopped reporting; the evidence gives its last step.",
        ),
        Rule(
            "TG1312",
            "environment-changed",
            _C,
            "The Python environment differs from the sealed snapshot given at start-up "
            "(see env verify).",
        ),
        Rule(
            "TG1313",
            "rank-stalled",
            _H,
            "No training step completed for far longer than usual (the watchdog's "
            "threshold): the rank hangs without dying, in its own code or in a "
            "collective waiting for a peer. The evidence gives the last completed step, "
            "where each thread is, and the collective it waits in, if any.",
        ),
        Rule(
            "TG1314",
            "rank-blocked",
            _L,
            "When a peer died or failed, this rank was alive but blocked in a collective "
            "(its watchdog's note says which): it waits behind the ranks TG1311 names, "
            "and is not one of them.",
        ),
        Rule(
            "TG1315",
            "check-skipped",
            _I,
            "A watch check could not look at some tensors (a kind it cannot read: sparse, "
            "nested, meta, quantized...) or failed inside; the step went on and the "
            "evidence names the tensors that went unchecked. Medium when a check failed; high "
            "from the third failure of the same check in a run (a check that keeps failing "
            "is blind, as one made to fail on purpose would be).",
        ),
        Rule(
            "TG1316",
            "declared-change",
            _L,
            "The training loop declared a change the guard would otherwise flag: weights "
            "written inside guard.outside_step() (SAM, Lookahead), a param group added "
            "through the watched optimizer, a hyper-parameter declared with guard.step(). "
            "The declaration itself is the evidence, kept in the ledger.",
        ),
        Rule(
            "TG1317",
            "buffer-changed-outside-forward",
            _C,
            "A registered buffer of the model (a causal mask, rotary or positional table, "
            "BatchNorm statistics) or a tensor a module holds as a plain attribute changed "
            "between the end of one optimizer step and the next forward, or was replaced: "
            "modules change their own buffers only inside forward. Names the buffer.",
        ),
        Rule(
            "TG1318",
            "module-setting-changed",
            _H,
            "A module's own setting (Dropout.p, LayerNorm.eps, an activation choice, a "
            "submodule, the training flag at a training forward) changed mid-run outside "
            "forward and was not declared with guard.step(changed=...). Names the module "
            "and the attribute.",
        ),
        Rule(
            "TG1319",
            "data-path-replaced",
            _H,
            "An object on the data loader's path (dataset, sampler, batch_sampler, "
            "batch_sampler.sampler, a sampler's generator, collate_fn) is no longer the "
            "one installed at start-up, and the swap was not declared: the loader reads "
            "data or order from somewhere the guard does not watch.",
        ),
        Rule(
            "TG1320",
            "own-scheduling-changed",
            _H,
            "What the process controls about its own scheduling changed mid-run: the "
            "training thread's nice value, policy or CPU set, another thread's nice value "
            "or policy, the autogroup's nice value, its cgroup or that cgroup's CPU limits. "
            "High when it takes CPU from training (the process slowing itself and passing "
            "the wait for a CPU off as a busy machine), low when it gives CPU.",
        ),
        Rule(
            "TG1321",
            "tensor-class-runs-code",
            _H,
            "A tensor the step computes with (a parameter, its gradient, optimizer state, "
            "the batch) is of a Python tensor class that is not torch's own and was not "
            "declared with watch(tensor_types=...): its __torch_function__, "
            "__torch_dispatch__ or methods run on every op that touches it, so the step is "
            "not the one the guard verifies (a class planted by a library, or __class__ "
            "swapped on a tensor). A declared class whose code changed since watch() too.",
        ),
        # -- seal: signatures and manifests (TG5xx) ---------------------------
        Rule(
            "TG501",
            "signature-invalid",
            _C,
            "The signature does not verify with the given public key: it was made "
            "with another key, or the signed manifest was edited after signing. "
            "Nothing it lists can be trusted; re-seal only from a trusted copy.",
        ),
        Rule(
            "TG502",
            "signature-malformed",
            _C,
            "The signature file is not a readable Sigstore bundle carrying a "
            "model-signing v1 manifest (truncated, corrupted, wrong media or "
            "payload type, unsupported hash or serialization).",
        ),
        Rule(
            "TG503",
            "sealed-file-modified",
            _C,
            "A file's content differs from the digest in the signed manifest (the "
            "evidence shows both hex digests and sizes). Someone changed it after "
            "it was sealed.",
        ),
        Rule(
            "TG504",
            "sealed-file-added",
            _H,
            "A file exists that the signed manifest does not list. Loaders may pick "
            "it up (an extra checkpoint shard, a config, code).",
        ),
        Rule(
            "TG505", "sealed-file-removed", _H, "A file listed in the signed manifest is missing."
        ),
        Rule(
            "TG506",
            "sealed-file-renamed",
            _H,
            "A listed file is missing and an unlisted file has exactly its content: "
            "it was renamed or moved (or two files swapped names).",
        ),
        Rule(
            "TG507",
            "seal-unsafe-path",
            _H,
            "A symbolic link, special file or path that escapes the sealed folder. "
            "Sealing refuses to follow it and verification reports it, since it "
            "would let content outside the folder pass as sealed.",
        ),
        Rule(
            "TG508",
            "seal-rollback",
            _H,
            "The signature verifies, but it is not the expected seal: its version is "
            "older than --min-version (or it records none), or its manifest digest is "
            "not the pinned --expect-digest. An older folder with its own valid "
            "signature from the same key was put in place of the current release.",
        ),
        Rule(
            "TG509",
            "seal-unexpected-name",
            _H,
            "The signature verifies, but the seal names another model than "
            "--expect-name: a seal of the same key for a different release or model.",
        ),
        Rule(
            "TG510",
            "seal-ignored-loadable",
            _M,
            "An entry left out by an ignore rule looks like something a loader would "
            "pick up (a checkpoint-N folder a trainer resumes from, a weights file, "
            "code, a file that starts like a pickle, zip or safetensors), so its "
            "content is not verified. Narrow the ignore rule.",
        ),
        Rule(
            "TG511",
            "seal-vcs-changed",
            _H,
            "A version-control file that can run commands (.git/config, .git/hooks/*, "
            ".gitattributes, .hg/hgrc) was added, changed or removed since sealing.",
        ),
        Rule(
            "TG512",
            "seal-vcs-unrecorded",
            _L,
            "A version-control folder is present, but the seal records nothing about "
            "its hooks and configuration (sealed by another tool or an older "
            "trainguard), so changes to them cannot be detected.",
        ),
        # -- environment verification (TG6xx) ----------------------------------
        Rule(
            "TG601",
            "env-file-modified",
            _H,
            "An installed file's content differs from the hash its distribution's RECORD "
            "gives (both digests are in the evidence). Someone edited installed code or "
            "data after pip installed it; reinstall the distribution from a trusted index "
            "(`pip install --force-reinstall --no-deps NAME==VERSION`).",
        ),
        Rule(
            "TG602",
            "env-file-missing",
            _M,
            "A file the distribution's RECORD lists is gone. Deleting a module can change "
            "behaviour (a fallback path, a disabled check); reinstall the distribution.",
        ),
        Rule(
            "TG603",
            "env-file-unlisted",
            _M,
            "A file in a site folder that no RECORD lists (medium for code, low for data). "
            "Pip never installs such files; they come from a hand copy, a tool that writes "
            "into site-packages, or an attacker. Compiled caches are judged by the pyc "
            "check instead.",
        ),
        Rule(
            "TG604",
            "env-module-shadow",
            _H,
            "A file no RECORD lists would be imported instead of an installed module (an "
            "extension module beside a .py, a package folder beside a module, or a "
            "top-level module earlier on sys.path), or is what an import that installed "
            "code tries when present runs (an optional dependency such as an accelerator or "
            "backend, found by reading the installed sources statically). Importing the "
            "name runs it.",
        ),
        Rule(
            "TG605",
            "env-pth-exec",
            _H,
            "A .pth file in a site folder has an `import` line, which the interpreter "
            "executes at every start, and no RECORD vouches for the file (unlisted or "
            "edited). This is how the 2026 litellm compromise ran code in every process.",
        ),
        Rule(
            "TG606",
            "env-pth-exec-owned",
            _I,
            "A .pth file runs code at every interpreter start, installed unchanged by the "
            "named distribution (e.g. setuptools' distutils-precedence.pth, editable "
            "installs). Listed so that the code that runs at start-up is known.",
        ),
        Rule(
            "TG607",
            "env-pth-path",
            _M,
            "A .pth file no RECORD vouches for adds folders to sys.path at every start, "
            "which makes whatever they hold importable: high when a folder is outside the "
            "site folders (nothing verifies what it holds), medium inside.",
        ),
        Rule(
            "TG608",
            "env-startup-module",
            _H,
            "A sitecustomize or usercustomize module on the interpreter's path: it runs at "
            "every start, and no RECORD vouches for it. Remove it unless you installed it "
            "knowingly (then allow it by path and sha256).",
        ),
        Rule(
            "TG609",
            "env-startup-module-owned",
            _L,
            "A sitecustomize or usercustomize module, installed unchanged by the named "
            "distribution; it runs at every start.",
        ),
        Rule(
            "TG610",
            "env-pyc-mismatch",
            _C,
            "A compiled .pyc that the interpreter would load instead of compiling its "
            "source holds different code than that source compiles to. RECORD has no hash "
            "for .pyc files, so this is how an edit hides behind a clean .py. Delete the "
            "__pycache__ folder and find who wrote it.",
        ),
        Rule(
            "TG611",
            "env-pyc-sourceless",
            _H,
            "A compiled module with no source beside it, which the interpreter imports as "
            "is, and which no RECORD hash vouches for.",
        ),
        Rule(
            "TG612",
            "env-pyc-unused",
            _L,
            "A compiled file the interpreter does not load (its source is gone, or its "
            "header no longer matches its source) and whose code is not its source's. "
            "Harmless until its source's timestamp matches again; delete it.",
        ),
        Rule(
            "TG613",
            "env-unverifiable",
            _I,
            "Part of the environment cannot be verified: a distribution without RECORD "
            "(installed by the OS package manager or a legacy installer), or an editable "
            "install whose code lives in a source folder.",
        ),
        Rule(
            "TG614",
            "env-record-invalid",
            _H,
            "A RECORD file is unreadable or malformed, or uses a weak hash (md5, sha1) "
            "that the wheel specification forbids; what it lists cannot be verified.",
        ),
        Rule(
            "TG615",
            "env-snapshot-modified",
            _C,
            "A file differs from the digest in the signed environment snapshot. This "
            "catches edits that rewrote RECORD too.",
        ),
        Rule(
            "TG616",
            "env-snapshot-added",
            _H,
            "A file that the signed environment snapshot does not list (high for code, "
            "medium for data). Compiled caches are judged by the pyc check instead.",
        ),
        Rule(
            "TG617",
            "env-snapshot-removed",
            _H,
            "A file listed in the signed environment snapshot is gone.",
        ),
        Rule(
            "TG618",
            "env-snapshot-interpreter",
            _H,
            "The interpreter (its path, version, bytecode magic or binary digest) differs "
            "from the one recorded in the signed snapshot.",
        ),
        Rule(
            "TG619",
            "env-wheel-modified",
            _C,
            "An installed file differs from the member of the wheel it was installed from "
            "(--wheelhouse/--lock), or a launcher for an entry point does more than call "
            "it. The wheel does not live on the host, so this catches edits that rewrote "
            "RECORD too.",
        ),
        Rule(
            "TG620",
            "env-wheel-extra",
            _H,
            "RECORD lists a file that the distribution's wheel does not hold and that no "
            "installer writes (pycs, RECORD, INSTALLER, REQUESTED, direct_url.json, entry "
            "point launchers): added after installation, with RECORD rewritten to match.",
        ),
        Rule(
            "TG621",
            "env-wheel-missing",
            _H,
            "A member of the distribution's wheel is not installed: deleted after "
            "installation together with its RECORD line (else plain verify says TG602). "
            "Deleting a module can switch a package to a fallback path or skip a check.",
        ),
        Rule(
            "TG622",
            "env-wheel-reference",
            _M,
            "The reference could not vouch for a distribution: no wheel of its name in the "
            "wheelhouse (medium), or (high) wheels of other versions only, not in the lock "
            "file, not the locked version, no wheel with a hash the lock lists, or a wheel "
            "that cannot be read.",
        ),
        Rule(
            "TG623",
            "env-launcher-template",
            _H,
            "A console-script launcher is not what an installer (pip, distlib, installer, "
            "uv) writes for its entry point: it was regenerated from the entry point and "
            "compared byte for byte, only the interpreter path in the shebang may differ. "
            "A RECORD row for it vouches for nothing: whoever edits it can rewrite the row.",
        ),
        Rule(
            "TG624",
            "env-path-entry-code",
            _H,
            "Code reachable through a sys.path entry that a .pth file adds, owned by no "
            "distribution: a module there under a name installed code or the standard "
            "library imports, an installed or standard-library module's name, or an "
            "archive (or any file) on the path, whose members zipimport runs.",
        ),
        Rule(
            "TG625",
            "env-autoload-entry-point",
            _H,
            "A distribution declares an entry point in a group that a library loads when "
            "it is imported (torch.backends: torch imports and calls it at import torch), "
            "or in a group another distribution's installed code names (found by reading "
            "its sources: pytorch_lightning.callbacks_factory, fsspec.specs, ...), and no "
            "off-host reference (--wheelhouse with --lock) vouches for its bytes. Found "
            "groups are medium in a plain verify (an honest plug-in looks the same), high "
            "with a reference that does not vouch.",
        ),
        Rule(
            "TG626",
            "env-unverifiable-code",
            _H,
            "Start-up code or importable code that only the site folder's own metadata "
            "vouches for: a sitecustomize or .pth import line whose only voucher is a "
            "RECORD row, a distribution without RECORD outside an OS package folder that "
            "provides modules; medium for an editable install's own module that other "
            "installed code imports (its source folder is not verified).",
        ),
        Rule(
            "TG627",
            "env-native-unlisted",
            _H,
            "A file no RECORD lists inside an installed package's folder that the dynamic "
            "loader can run (ELF, Mach-O or PE magic, or a library's name such as .so, "
            ".so.N, .dylib, .pyd, .dll): a library is found by search path (RUNPATH "
            "$ORIGIN) and its constructor runs without any import naming it.",
        ),
        Rule(
            "TG628",
            "env-record-foreign",
            _H,
            "A RECORD row for a file in a folder whose other files another distribution's "
            "RECORD lists: a RECORD vouches only for its own distribution's folders, so "
            "a row added to some other RECORD for a planted file vouches for nothing.",
        ),
        Rule(
            "TG629",
            "env-venv-setup",
            _H,
            "A virtual environment's own start-up files are not what they must be: "
            "pyvenv.cfg's home is inside the venv or not a folder (the interpreter and "
            "standard library live where nothing verifies them), bin/python* does not lead "
            "to home's interpreter (a wrapper script runs first), or bin/activate* differs "
            "from what the standard library's venv module writes for this venv beyond its "
            "folder, name, prompt and interpreter path. Medium: activate names another "
            "folder (a copied venv), or include-system-site-packages is true (folders this "
            "verify did not look at); low: activate scripts of another tool, not compared.",
        ),
        # -- safetensors (TG8xx) -----------------------------------------------
        Rule(
            "TG801",
            "safetensors-malformed",
            _H,
            "The safetensors header breaks the format: a length past the file or the "
            "format's cap, invalid JSON, an unknown dtype, offsets that overlap, leave gaps, "
            "reach past the data or disagree with the shape and dtype, or a file longer or "
            "shorter than its tensors. Loaders refuse such files today, but parsers of this "
            "header have had memory-safety bugs; do not load it with anything else.",
        ),
        Rule(
            "TG802",
            "safetensors-duplicate-key",
            _H,
            "The header names the same key twice. JSON readers disagree about which one "
            "wins (the safetensors library takes the last), so two tools can see different "
            "tensors in one file.",
        ),
        Rule(
            "TG803",
            "safetensors-code-in-metadata",
            _M,
            "A `__metadata__` value carries something that looks like code: a pickle (raw "
            "or base64), Python that imports or evaluates, or a shell command. safetensors "
            "itself never runs it, but a loader that decodes metadata might; the evidence "
            "quotes it.",
        ),
        # -- gguf and chat templates (TG9xx) -----------------------------------
        Rule(
            "TG901",
            "chat-template-code-execution",
            _C,
            "The chat template reaches Python internals (dunder attributes, __globals__, "
            "__builtins__, imports, os/popen/eval) or a Jinja gadget leading there. Any "
            "application that renders it without a sandbox (llama-cpp-python before 0.2.72, "
            "CVE-2024-34359; SGLang's reranker, CVE-2026-5760) runs the attacker's code.",
        ),
        Rule(
            "TG902",
            "chat-template-hidden-instruction",
            _M,
            "The chat template injects text only when a message contains a particular "
            "trigger string: a hidden instruction that changes the model's behaviour for "
            "whoever knows the trigger. Nothing executes; the evidence quotes the branch "
            "so a reviewer can judge it.",
        ),
        Rule(
            "TG903",
            "chat-template-token-scan",
            _I,
            "jinja2 is not installed, so the chat template was checked by a conservative "
            "token scan instead of a parse, and hidden-instruction analysis was skipped. "
            "Install `trainguard[templates]` for the full analysis.",
        ),
        Rule(
            "TG904",
            "chat-template-unparseable",
            _M,
            "The chat template does not parse as Jinja. Renderers refuse it, but other "
            "template engines (llama.cpp's minja) may read it differently; a token scan "
            "reports anything dangerous inside it separately.",
        ),
        Rule(
            "TG905",
            "chat-template-unsafe-construct",
            _H,
            "The chat template does something a sandboxed environment refuses or that no "
            "chat template needs, without a provable path to code: attribute names built at "
            "render time, list or dict mutation, include/import, gadget globals such as "
            "lipsum or cycler, huge ranges.",
        ),
        Rule(
            "TG911",
            "gguf-malformed",
            _H,
            "The GGUF header, key-value table or tensor table breaks the format: a bad "
            "version, truncation, unknown value types, over-long names, more than four "
            "dimensions, misaligned, overlapping or out-of-file tensors. llama.cpp refuses "
            "most of these, but its parser has had heap overflows on exactly such fields "
            "(CVE-2024-21802, CVE-2024-21836, CVE-2026-27940 and others).",
        ),
        Rule(
            "TG912",
            "gguf-duplicate",
            _H,
            "Two metadata keys or two tensors share a name. llama.cpp refuses the file; "
            "other readers keep the first or the last, so tools can disagree about what "
            "the model is.",
        ),
        Rule(
            "TG913",
            "gguf-irregular",
            _L,
            "The GGUF file is unusual but not dangerous: a tensor type newer than "
            "trainguard knows (its size was not checked), tensors out of order or with "
            "gaps, trailing bytes, nested arrays.",
        ),
        Rule(
            "TG914",
            "gguf-code-in-metadata",
            _M,
            "A GGUF metadata string (other than a chat template, which is analysed on its "
            "own) carries something that looks like code: a pickle, Python that imports or "
            "evaluates, or a shell command. llama.cpp never runs it; a tool that decodes "
            "metadata might. The evidence quotes it.",
        ),
        # -- keras (TG10xx) ----------------------------------------------------
        Rule(
            "TG1001",
            "keras-lambda",
            _C,
            "A Keras Lambda layer (or serialized lambda) carries Python code, as marshalled "
            "bytecode or source. Keras runs it when the model loads or is called with "
            "safe_mode off, and older Keras and tf.keras without asking (CVE-2024-3660). "
            "The evidence lists the names the bytecode uses. Do not load it outside a sandbox.",
        ),
        Rule(
            "TG1002",
            "keras-unsafe-reference",
            _C,
            "The model config names a module, class or function outside Keras' modelling "
            'code (`{"module": "os", "class_name": "system"}`, a Python builtin, or '
            "a Keras utility such as keras.utils.get_file). Keras before 3.9 imports and "
            "calls whatever the config names, even in safe_mode (CVE-2025-1550), and "
            "utilities reached this way have bypassed later fixes (CVE-2025-8747). A "
            "custom layer of your own can be allowed by its module in a policy.",
        ),
        Rule(
            "TG1003",
            "keras-tfsmlayer",
            _H,
            "A TFSMLayer loads a TensorFlow SavedModel from the path in its config and runs "
            "its graph, which can read and write files (CVE-2026-1462). Check what the "
            "path points to, and scan that SavedModel too.",
        ),
        Rule(
            "TG1004",
            "keras-external-class",
            _M,
            "The model config builds a class from a Keras ecosystem package (keras_hub, "
            "keras_cv, keras_nlp, keras_rs) that Keras imports when it loads the model. "
            "Common for pretrained models; trust it as you trust the installed package.",
        ),
        Rule(
            "TG1005",
            "keras-embedded-pickle",
            _H,
            "A TorchModuleWrapper layer carries a pickled torch module that Keras unpickles "
            "with torch.load(weights_only=False) when safe_mode is off. The pickle itself "
            "is analysed and its findings reported separately.",
        ),
        # -- tensorflow and onnx (TG11xx) ----------------------------------------
        Rule(
            "TG1101",
            "tf-python-op",
            _C,
            "The SavedModel's graph calls back into Python (PyFunc, EagerPyFunc, "
            "PyFuncStateless). A model from someone else has no reason to; the function it "
            "names runs in the loading process.",
        ),
        Rule(
            "TG1102",
            "tf-file-write",
            _H,
            "The SavedModel's graph writes files (WriteFile, checkpoint saves outside the "
            "standard save function, dataset or summary writers, PrintV2 into a file). A "
            "graph that runs while loading or serving can overwrite shell profiles, code or "
            "other models.",
        ),
        Rule(
            "TG1103",
            "tf-file-read",
            _M,
            "The SavedModel's graph reads files or lists folders (ReadFile, MatchingFiles, "
            "readers, file datasets, ImmutableConst, restores outside the standard restore "
            "function). Input pipelines do this legitimately; a served model can also leak "
            "what it reads through its outputs.",
        ),
        Rule(
            "TG1104",
            "tf-network",
            _H,
            "The SavedModel's graph reaches other hosts: RPC ops, tf.data service ops, or "
            "debug ops whose debug_urls send tensors to a grpc:// or file:// address.",
        ),
        Rule(
            "TG1111",
            "onnx-external-data-escape",
            _C,
            "A tensor's external data location is absolute or climbs out of the model's "
            "folder. onnx.load reads, and onnx.save writes, whatever file it names "
            "(CVE-2022-25882, CVE-2024-27318): a model can read a user's keys into its "
            "weights or overwrite files when re-saved.",
        ),
        Rule(
            "TG1112",
            "onnx-custom-domain",
            _M,
            "Operators come from a domain outside the ONNX standard and ONNX Runtime's "
            "own. The model needs a custom operator library, native code that the user "
            "must load; make sure it comes from a source you trust.",
        ),
        Rule(
            "TG1113",
            "onnx-python-op",
            _H,
            "The model uses ONNX Runtime's PythonOp, which calls a Python function "
            "registered in the loading process by name.",
        ),
        # -- repositories and hub (TG14xx) -------------------------------------
        Rule(
            "TG1401",
            "remote-code-config",
            _H,
            "A config of the repository (config.json, tokenizer_config.json, a processor "
            "config) asks for remote code: its auto_map or custom_pipelines name classes in "
            "Python modules, which transformers imports and runs when the model is loaded "
            "with trust_remote_code=True. The message names the modules and classes; read "
            "them (and what they import) before trusting the repository, or pin a revision "
            "you have reviewed.",
        ),
        Rule(
            "TG1402",
            "remote-code-module",
            _H,
            "A Python file that a config's auto_map or custom_pipelines points to: it runs in "
            "the loading process as soon as the model, tokenizer or pipeline is loaded with "
            "trust_remote_code=True.",
        ),
        Rule(
            "TG1403",
            "remote-code-import",
            _M,
            "A Python file that remote code imports (a relative import from a module a config "
            "points to): transformers fetches it with that module and it runs too when the "
            "repository is trusted.",
        ),
        Rule(
            "TG1404",
            "repository-python-file",
            _L,
            "A Python file in a model repository that no config points to. Loading the model "
            "does not run it, but it is code shipped with the model that a user or script "
            "may run by hand.",
        ),
        Rule(
            "TG1405",
            "remote-code-dangerous-call",
            _H,
            "Python code that runs when the repository is trusted starts processes, runs "
            "dynamic code, deletes files or opens network connections (os.system, subprocess, "
            "exec, socket, ...). Modelling code has little reason to; the evidence quotes the "
            "line.",
        ),
        Rule(
            "TG1410",
            "hub-revision",
            _I,
            "The files came from the Hugging Face Hub (or its local cache): the finding pins "
            "the repository and the commit that was scanned, so a later load can ask for the "
            "very same revision.",
        ),
        # -- explain (TG15xx) --------------------------------------------------
        Rule(
            "TG1501",
            "frozen-parameter-changed",
            _H,
            "Between the two checkpoints a parameter changed that no optimizer step could "
            "move: it is saved with requires_grad=False, or the saved optimizer holds no "
            "state for it (it never received a gradient). Someone edited the weights outside "
            "training; the evidence gives how many elements changed and by how much.",
        ),
        Rule(
            "TG1502",
            "optimizer-step-inconsistent",
            _H,
            "The optimizer's step counters disagree with its moments: Adam's exp_avg is larger "
            "than the counted steps can build against exp_avg_sq, exp_avg_sq is negative, "
            "moments changed while the counter did not, or counters went back for some "
            "parameters and forward for others. The counter or the moments were replaced.",
        ),
        Rule(
            "TG1503",
            "optimizer-update-inconsistent",
            _H,
            "A parameter moved in a way the saved optimizer state cannot explain: against the "
            "direction Adam's moments (or SGD's momentum buffer) predict, far more or less than "
            "one step at the saved learning rate, or without any optimizer step. This is what a "
            "flipped or scaled update, or an edit at rest, looks like.",
        ),
        Rule(
            "TG1504",
            "concentrated-change",
            _H,
            "Only a few elements of a tensor changed (1% or less) while every other tensor is "
            "identical or changed densely. Gradient steps change tensors densely; a handful of "
            "edited weights is how backdoors and targeted sabotage look. The evidence lists the "
            "changed indices. Whole changed rows (embeddings of the tokens seen) are not flagged.",
        ),
        Rule(
            "TG1505",
            "optimizer-step-uneven",
            _M,
            "Parameters of one optimizer group carry different step counters, or advanced by "
            "different numbers of steps between the checkpoints. Legitimate when layers were "
            "frozen or unfrozen during training; otherwise some state was replaced.",
        ),
        Rule(
            "TG1510",
            "replay-diverges",
            _H,
            "`trainguard replay` re-ran a step of a watched run from its checkpoint, with the "
            "same code, data and random states under the same conditions, and the step's "
            "fingerprints differ from the ledger's. The step did not happen the way honest "
            "training does it: the message names the first such step, what differs (batch, "
            "weights before the step, loss, update, optimizer state, learning rate) and which "
            "tensors. A step function that is not the training code also gives this.",
        ),
        Rule(
            "TG1511",
            "checkpoint-mismatch",
            _H,
            "A checkpoint of a watched run does not match its ledger: the file's BLAKE3 digest "
            "differs from the one recorded when it was saved, or the weights or optimizer state "
            "it holds differ from the ledger's state at its step, or the state it carries "
            "besides them (scheduler, hyper-parameters, random generators, data position) is "
            "not what recomputing the segment before it ends in (where that segment was not "
            "recomputed: not the entry's schedule stepped to its count, or not the random "
            "states the last step's record took), a generator of the script's own carried in "
            "data_state included; the first checkpoint is held to the entry's fresh build, "
            "its optimizer state too. It was edited at rest, or changed in the "
            "training process before the save. Do not train or ship from it.",
        ),
        Rule(
            "TG1512",
            "replay-not-comparable",
            _M,
            "A replay ran under conditions that bit-exact replay needs held equal (torch, Python "
            "or numpy version, thread count, deterministic-algorithm flags, CPU capability, "
            "device) but that differ from the recorded run. A divergence under them proves "
            "nothing either way (medium); a replay that matched anyway is noted (info). Replay "
            "on a machine like the original one.",
        ),
        Rule(
            "TG1513",
            "clock-disagrees-with-server",
            _H,
            "On a PostgreSQL ledger every record carries the server's own time. Over a stretch "
            "of steps of one rank, the server saw more time pass than the steps' recorded "
            "durations add up to, or the records arrived faster than those durations (held "
            "back, then written in a burst), by more than the measured slack (2 s, plus 0.1% "
            "for clock rates): the guard's clock was made to hide time (sleeps that slow "
            "training, work done on the side) from the step-time check. High for the step "
            "durations and for a missing or repeated step record; medium for the records' wall "
            "times, which an honest clock step (NTP) can also move, for a ledger-outage record "
            "the server's times do not back, and for step records without a server time.",
        ),
        Rule(
            "TG1514",
            "verifier-coverage",
            _H,
            "`trainguard verify-run` accounts for every recorded step of every rank as "
            "recomputed, skipped by its keyed draw, or uncovered, and the ledger's shape does "
            "not let it do so honestly: recorded steps no segment covered when the run ended, a "
            "checkpoint record whose position is not the rank's step count when it was "
            "written (ahead of the step records), a second checkpoint at one position, records "
            "after a run-end, a run-end whose step count is not the rank's, or a world size "
            "the streams do not show. The message names the steps, rank and record.",
        ),
        Rule(
            "TG1515",
            "verifier-chain-foreign",
            _H,
            "The verifier's own chain (RUN/verify) holds records the verifier did not write "
            "(a forged verdict or alert, or a head no verifier key signed). The verifier never "
            "signs over them: it names them here and goes on in a fresh stream of its chain.",
        ),
        Rule(
            "TG1520",
            "sealed-sample-differs",
            _H,
            "A sample of a sealed dataset (`trainguard data seal`) is not the one the signed "
            "manifest lists: its bytes on disk differ from the sealed digest, or the batch "
            "training fed at a step holds, at the named position, other content than the sample "
            "the seed's order puts there (relabelled, poisoned, or another sample). The message "
            "names the step, the sample index, its shard and record, and the rank. Restore the "
            "shard from the sealed copy (`trainguard data verify` lists every changed sample) "
            "and retrain from the last checkpoint before the step.",
        ),
        Rule(
            "TG1521",
            "sample-order-differs",
            _H,
            "The sample indices a step's batch came from are not the ones the data loader's "
            "sampler gives from the seed the checkpoint restores: samples were reordered, "
            "duplicated, dropped or replaced by index. The message names the step, the expected "
            "sample index and shard at each differing position, and the rank. Find what changed "
            "the sampler or its generator (a re-seed, a patched sampler) and retrain from the "
            "last checkpoint before the step.",
        ),
        Rule(
            "TG1522",
            "dataset-seal-mismatch",
            _H,
            "A dataset does not match its signed manifest as a whole: a shard is missing, added, "
            "of another size, or does not parse as its format (a garbage or truncated shard, a "
            "read limit reached); or the manifest's sidecar of per-sample digests is not the "
            "signed one; or a run was recorded reading another sealed dataset than the replay's. "
            "Do not train on it until `trainguard data verify` passes.",
        ),
        Rule(
            "TG1523",
            "samples-not-recorded",
            _H,
            "Replay reads sealed data, but the run's ledger holds no record of the samples a "
            "step's batch came from: the loop passed no batch to `guard.step(batch=...)`, or "
            "the guard was not given the data loader, so which samples trained cannot be "
            "checked. Pass both (docs/data.md); until then the run's data is unverified.",
        ),
    )
}


def rule(rule_id: str) -> Rule:
    return RULES[rule_id]


def finding(
    rule_id: str,
    message: str,
    *,
    file: str = "",
    member: str = "",
    offset: int | None = None,
    trigger: str = "",
    severity: Severity | None = None,
    evidence: dict[str, str] | None = None,
) -> Finding:
    """A finding of ``rule_id`` at the rule's default severity (unless ``severity``)."""
    return Finding(
        rule_id,
        RULES[rule_id].severity if severity is None else severity,
        message,
        file=file,
        member=member,
        offset=offset,
        trigger=trigger,
        evidence=evidence or {},
    )


def finding_with(rule_id: str, message: str, trigger: str = "", **evidence: str) -> Finding:
    """:func:`finding` with the evidence given as keywords; empty values are left out."""
    return finding(
        rule_id,
        message,
        trigger=trigger,
        evidence={k: v for k, v in evidence.items() if v},
    )


def rules_markdown() -> str:
    lines = [
        "# Rules",
        "",
        "Every finding names one of these ids. Ids are stable; severities are the",
        "defaults, which a policy file may change (see `docs/policy.md`).",
        "Generated by `trainguard rules --markdown`; do not edit by hand.",
        "",
        "| id | name | default severity | what it means and what to do |",
        "|---|---|---|---|",
    ]
    for r in RULES.values():
        lines.append(f"| {r.id} | {r.title} | {r.severity} | {r.help} |")
    return "\n".join(lines) + "\n"
