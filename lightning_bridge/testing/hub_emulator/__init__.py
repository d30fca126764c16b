"""A local Hugging Face Hub emulator, for testing publishing code offline.

:class:`HubEmulator` is a small HTTP server (standard library only: ``http.server``) that speaks the
Hub's HTTP protocol the way the ``huggingface_hub`` client (1.33 to 2.x) uses it, and keeps the
repositories it receives on disk. Code that publishes checkpoints (``HfApi.create_repo``,
``create_commit``, ``upload_folder``, ``upload_file``, ``preupload_lfs_files``, ``create_branch``, ...)
and code that reads them back (``hf_hub_download``, ``snapshot_download``, ``list_repo_files``,
``model_info``, ``file_exists``, ``list_repo_refs``, ...) can then be tested end to end on
127.0.0.1, without network access and without an account::

    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_DISABLE_XET = True   # see "Client settings" below

    from huggingface_hub import HfApi, snapshot_download
    from lightning_bridge.testing import HubEmulator

    with HubEmulator(token="secret") as emu:
        api = HfApi(endpoint=emu.endpoint, token="secret")
        api.create_repo("me/tiny-model")
        api.upload_folder(repo_id="me/tiny-model", folder_path="checkpoint/")
        path = snapshot_download("me/tiny-model", endpoint=emu.endpoint, token="secret", cache_dir=tmp)

From a shell (``python -m lightning_bridge.testing.hub_emulator serve --root DIR --port N``, see
:func:`~.cli.main`), it serves until Ctrl-C; point any client at it with
``HF_ENDPOINT=http://127.0.0.1:<port> HF_HUB_DISABLE_XET=1`` (and ``HF_TOKEN=<token>`` if started
with ``--token``).

Client settings
---------------
* **Xet must be disabled on the client.** ``huggingface_hub`` uploads through the Xet storage
  protocol whenever the ``hf_xet`` package is installed, and (since 1.20) it does not fall back to
  plain Git LFS. The emulator only implements the LFS "basic" transfer, so set
  ``HF_HUB_DISABLE_XET=1`` in the environment *before* ``huggingface_hub`` is imported, or set
  ``huggingface_hub.constants.HF_HUB_DISABLE_XET = True`` at run time (the flag is read on every
  upload). The emulator never advertises Xet (no ``X-Xet-*`` headers, only the ``basic`` LFS
  transfer), so downloads always use plain HTTP.
* Pass ``endpoint=emu.endpoint`` to ``HfApi``/``hf_hub_download``/``snapshot_download`` (or set
  ``HF_ENDPOINT`` before import), and make sure ``HF_HUB_OFFLINE`` is not set.
* If the emulator was started with a ``token``, every request must carry
  ``Authorization: Bearer <token>`` (pass ``token=...`` to the client); otherwise any token, or
  none, is accepted. LFS upload URLs handed out by the batch endpoint are signed (like the
  pre-signed storage URLs of the real Hub), because the client sends those PUTs without its token.

What is emulated
----------------
* Repos of type model, dataset and space under ``<namespace>/<name>`` ids. As on the Hub,
  ``create_repo`` makes an initial commit holding the Hub's default ``.gitattributes``, so a new
  repo lists one file. A repo id without a namespace is created under the caller's user name
  (``whoami``: ``username`` if given, else ``user-<8 hex of sha256(token)>``, else ``anonymous``).
* Upload modes (``preupload``): LFS for the usual binary extensions (``.safetensors``, ``.bin``,
  ``.pt``, ``.png``, ... the Hub's default ``.gitattributes`` patterns), for files of 10 MB or more,
  and for samples containing NUL bytes; "regular" (inline, base64 in the commit) otherwise.
* Git LFS batch API (``basic`` transfer, single PUT, optional verify step), content checked
  against its sha256.
* Atomic commits: every operation of a commit applies, or none does. A commit that references an
  LFS object that was never uploaded is refused (400) and changes nothing. ``parentCommit`` is
  honoured (412 when the branch moved). Commits may target a branch or an open ``refs/pr/N``;
  ``create_pr=True`` opens a pull-request ref ``refs/pr/N`` (no discussions, no merging).
* Branches (create with ``startingPoint``, delete), tags, refs listing, commit history, tree
  listing (recursive, ``expand`` with ``lastCommit``), paths-info, model/dataset/space info with
  ``siblings`` (``cardData``/``tags`` from the README front matter when PyYAML is importable),
  ``resolve`` downloads with ``ETag``/``X-Linked-Etag``/``X-Linked-Size``/``X-Repo-Commit`` and
  ``Range`` support, repo deletion, visibility settings, ``whoami-v2``, ``validate-yaml``.
* Errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) and
  ``X-Error-Message`` headers so the client raises its usual exception types.
* Fault injection (:meth:`HubEmulator.inject_fault`) and a request log
  (:attr:`HubEmulator.requests`) for testing retry and error paths.

What is not emulated
--------------------
Xet storage; LFS multipart uploads (the batch answer never asks for them); access control beyond
the single shared token (the ``private`` flag is stored and reported, but every caller sees every
repo, and any namespace may be written to); organizations, gated repos, rate limits (other than
injected 429s); discussions, PR merging, Spaces runtimes, Inference, webhooks, collections, search
and listing endpoints (``list_models`` ...); ``.gitignore`` handling in preupload
(``shouldIgnore`` is always false); server-side copies of LFS files across repos
(``lfs-files/duplicate``); repo renames; squashing; garbage collection (blobs are content-addressed
under ``<root>/blobs`` and shared by all repos, so an LFS object uploaded to one repo can be
referenced from another); pagination (every listing fits in one page); HTTP keep-alive (each
response closes its connection).

Repos are kept on disk under ``root`` (layout: see :mod:`.storage`), so a later emulator on the same
root serves the same repos.

Where things are
----------------
:mod:`.emulator` holds :class:`HubEmulator` (start/stop, fault injection, the request log);
:mod:`.server` the HTTP server and the request routing; :mod:`.read_api` and :mod:`.write_api` the
endpoints; :mod:`.handler` the HTTP plumbing they share; :mod:`.storage` the repos on disk (and
their layout); :mod:`.protocol` the Hub's rules (LFS patterns, names, errors); :mod:`.faults` the
injected faults; :mod:`.cli` the ``serve`` command. Only the standard library is needed (PyYAML
optional), and the modules import each other relatively, so the package also runs on its own:
``PYTHONPATH=lightning_bridge/testing python -m hub_emulator serve``.
"""

from .cli import main
from .emulator import HubEmulator
from .handler import RequestRecord

__all__ = ["HubEmulator", "RequestRecord", "main"]
