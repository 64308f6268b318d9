"""The device's TUF client: what the fleet assigns to this device, verified, and the bundle bytes, verified.

Two repositories, as in Uptane. The **director** (``/tuf/director/<device>/metadata/``) says which bundles this
device should run; the **image** repository (``/tuf/image/``) says which bundles are genuine. A director target is
only accepted when the image repository lists the same path with the same length, sha256 and custom fields
(asset, version, release, base_sha256), and when the director's metadata names this device. Both are fetched
with ``tuf.ngclient`` from the roots the device was provisioned with (``edgepeft fleet tuf roots``), sending the
device's credential.

The trusted state (``STATE/tuf``) only ever moves forward as a whole: each call works on a copy and swaps it in
when everything verified, so a refused answer (an attack, a corrupt mirror) leaves the state exactly as it was.
Policy stays with the caller: whether a release is newer than what the runtime runs is the agent's decision.

Example (a root that is not TUF metadata is refused before anything is fetched, and nothing is written):
    >>> import tempfile
    >>> from pathlib import Path
    >>> state = Path(tempfile.mkdtemp())
    >>> client = UpdateClient("http://127.0.0.1:9", "pump-7", "efd_x", state, b"{}", b"{}", timeout=1.0)
    >>> try:
    ...     client.assigned()
    ... except UpdateError as exc:
    ...     type(exc).__name__
    'VerificationFailed'
    >>> sorted(p.name for p in state.iterdir())
    []
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib import parse

import httpx
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from edgepeft.core.errors import EdgePeftError

DEVICE_FIELD = "device_id"  # the director signs whose metadata it is (edgepeft.fleet.tuf_repo.DEVICE_FIELD)
TARGET_SUFFIX = ".edelta"
USER_AGENT = "edgepeft-agent/0.1"


class UpdateError(EdgePeftError):
    """Fetching updates failed; nothing was installed and the trusted state is unchanged."""


class ServerUnreachable(UpdateError):
    """The server could not be reached or answered with a server error: retry later, with backoff."""


class VerificationFailed(UpdateError):
    """What the server (or someone in between) sent does not verify: an attack or corruption. Never install it;
    report it. ``__cause__`` is the TUF error when TUF refused it."""


@dataclass(frozen=True)
class AssignedTarget:
    """A bundle the director assigns to this device, as the image repository vouches for it."""

    asset_id: str
    version: str
    release: int
    base_sha256: str
    sha256: str
    length: int
    path: str


class BearerFetcher(FetcherInterface):
    """TUF's network layer over httpx, sending ``Authorization: Bearer <credential>`` on every request."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.client.send(self.client.build_request("GET", url), stream=True)
        if response.status_code >= 400:
            try:
                detail = " ".join(response.read()[:300].decode(errors="replace").split())
            except httpx.HTTPError:
                detail = ""
            finally:
                response.close()
            raise tuf_errors.DownloadHTTPError(f"HTTP {response.status_code} for {url}: {detail}",
                                               response.status_code)
        return self._chunks(response)

    @staticmethod
    def _chunks(response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(64 * 1024)
        except httpx.HTTPError as exc:
            # Mid-body failures surface while TUF iterates, outside fetch()'s own wrapping.
            raise tuf_errors.DownloadError(f"download interrupted: {type(exc).__name__}") from exc
        finally:
            response.close()


class UpdateClient:
    """This device's view of the fleet's updates, verified through TUF (see the module docstring).

    Args:
        server_url: the fleet server, e.g. ``https://fleet.example:8443``.
        device_id: this device's id in the registry.
        credential: this device's credential (``efd_...``).
        state_dir: where the trusted metadata (``tuf/``) and downloaded bundles (``targets/``) are kept.
        image_root, director_root: the root metadata the device was provisioned with (its trust anchors).
        timeout: seconds for connecting and between bytes.
        transport: an httpx transport (e.g. for a custom TLS set-up); default: httpx's.
    """

    def __init__(self, server_url: str, device_id: str, credential: str, state_dir: Path, image_root: bytes,
                 director_root: bytes, *, timeout: float = 30.0, transport: httpx.BaseTransport | None = None
                 ) -> None:
        self.server_url = server_url.rstrip("/")
        self.device_id = device_id
        self.credential = credential
        self.state_dir = Path(state_dir)
        self.image_root = image_root
        self.director_root = director_root
        self.timeout = timeout
        self.transport = transport

    # ------------------------------------------------------------------------------------------- public
    def assigned(self, base_sha256: str | None = None) -> list[AssignedTarget]:
        """The bundles the director assigns to this device, each cross-checked with the image repository; with
        ``base_sha256`` (the base model this device runs), a target for another base is refused too."""
        with self._trusted_state() as (work, http):
            director = self._updater(work / "director", http, f"tuf/director/{parse.quote(self.device_id)}",
                                     self.director_root, targets=False)
            director.refresh()
            listed = Metadata[Targets].from_file(str(work / "director" / "targets.json")).signed
            if listed.unrecognized_fields.get(DEVICE_FIELD) != self.device_id:
                raise VerificationFailed(f"the director metadata served to {self.device_id!r} is for device "
                                         f"{listed.unrecognized_fields.get(DEVICE_FIELD)!r}; refusing it")
            image = self._updater(work / "image", http, "tuf/image", self.image_root, targets=True)
            image.refresh()
            targets = []
            for path in sorted(listed.targets):
                target = self._cross_check(path, listed.targets[path], image.get_targetinfo(path))
                if base_sha256 is not None and target.base_sha256 != base_sha256:
                    raise VerificationFailed(f"{path} is built for base {target.base_sha256[:16]}…, but this device "
                                             f"runs {base_sha256[:16]}…; refusing it")
                targets.append(target)
            return targets

    def download(self, target: AssignedTarget) -> bytes:
        """The bundle's bytes, verified against the image repository's current metadata (length and sha256); kept
        under ``STATE/targets`` so that a second call (or a restart) does not download it again."""
        with self._trusted_state() as (work, http):
            image = self._updater(work / "image", http, "tuf/image", self.image_root, targets=True)
            info = image.get_targetinfo(target.path)
            if info is None or info.length != target.length or info.hashes.get("sha256") != target.sha256:
                raise VerificationFailed(f"{target.path} (sha256 {target.sha256[:16]}…) is not what the image "
                                         "repository lists now; call assigned() again")
            cached = image.find_cached_target(info)
            if cached is None:
                final = self.state_dir / "targets" / parse.quote(info.path, "")  # as find_cached_target names it
                partial = final.with_name(final.name + ".partial")
                image.download_target(info, filepath=str(partial))  # verified before it is written
                os.replace(partial, final)  # a crash mid-download leaves no half file under the final name
                cached = str(final)
            return Path(cached).read_bytes()

    # ------------------------------------------------------------------------------------------- internals
    def _updater(self, metadata_dir: Path, http: httpx.Client, prefix: str, root: bytes, *, targets: bool
                 ) -> Updater:
        metadata_dir.mkdir(parents=True, exist_ok=True)
        target_dir = self.state_dir / "targets"
        if targets:
            target_dir.mkdir(parents=True, exist_ok=True)
        # A fresh Updater per call: one instance refreshes only once (pitfall 2).
        return Updater(str(metadata_dir), f"{self.server_url}/{prefix}/metadata/",
                       target_dir=str(target_dir) if targets else None,
                       target_base_url=f"{self.server_url}/{prefix}/targets/" if targets else None,
                       fetcher=BearerFetcher(http), config=UpdaterConfig(app_user_agent=USER_AGENT),
                       bootstrap=root)

    def _cross_check(self, path: str, director: TargetFile, image: TargetFile | None) -> AssignedTarget:
        if image is None:
            raise VerificationFailed(f"the director assigns {path}, which the image repository does not list; "
                                     "refusing it")
        if (director.length, director.hashes, director.custom) != (image.length, image.hashes, image.custom):
            raise VerificationFailed(f"the director and the image repository disagree about {path} (length, "
                                     "hashes or custom fields); refusing it")
        custom: dict[str, Any] = image.custom
        try:
            target = AssignedTarget(asset_id=str(custom["asset"]), version=str(custom["version"]),
                                    release=int(custom["release"]), base_sha256=str(custom["base_sha256"]),
                                    sha256=image.hashes["sha256"], length=image.length, path=path)
        except (KeyError, TypeError, ValueError):
            raise VerificationFailed(f"{path} lacks the custom fields asset, version, release, base_sha256, or "
                                     "its sha256") from None
        if path != f"{target.asset_id}/{target.version}{TARGET_SUFFIX}":
            raise VerificationFailed(f"{path} does not match its custom fields ({target.asset_id} "
                                     f"{target.version}); refusing it")
        return target

    @contextlib.contextmanager
    def _trusted_state(self) -> Iterator[tuple[Path, httpx.Client]]:
        """A working copy of the trusted metadata, swapped in only when the whole call succeeded."""
        live, work, old = (self.state_dir / name for name in ("tuf", "tuf.work", "tuf.old"))
        if not live.exists() and old.exists():
            old.rename(live)  # a crash between the two renames of a swap
        shutil.rmtree(work, ignore_errors=True)
        committed = False
        try:
            if live.exists():
                shutil.copytree(live, work, symlinks=True)
            else:
                work.mkdir(parents=True)
            headers = {"Authorization": f"Bearer {self.credential}", "User-Agent": USER_AGENT}
            with httpx.Client(headers=headers, timeout=self.timeout, transport=self.transport) as http:
                try:
                    yield work, http
                except UpdateError:
                    raise
                except (tuf_errors.RepositoryError, tuf_errors.DownloadError, DeserializationError, OSError,
                        ValueError) as exc:
                    raise _classify(exc) from exc
            shutil.rmtree(old, ignore_errors=True)
            if live.exists():
                live.rename(old)
            work.rename(live)
            committed = True
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if not committed:
                shutil.rmtree(work, ignore_errors=True)


def _classify(exc: Exception) -> UpdateError:
    """TUF's and the network's errors, in the agent's terms: retry later, or never install."""
    text = " ".join(str(exc).split())[:300]
    if isinstance(exc, tuf_errors.DownloadLengthMismatchError):
        return VerificationFailed(f"a download was longer than its signed length: {text}")
    if isinstance(exc, tuf_errors.DownloadHTTPError):
        if exc.status_code >= 500:
            return ServerUnreachable(f"the fleet server answered {exc.status_code}: {text}")
        if exc.status_code in (401, 403):
            return UpdateError(f"the fleet server refused this device's credential ({exc.status_code}): {text}; "
                               "check --credential-file")
        return UpdateError(f"the fleet server answered {exc.status_code}: {text}")
    if isinstance(exc, tuf_errors.DownloadError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{type(cause).__name__}: {' '.join(str(cause).split())[:200]}" if cause else text
        return ServerUnreachable(f"cannot reach the fleet server ({detail}); will retry")
    if isinstance(exc, tuf_errors.RepositoryError):
        return VerificationFailed(f"TUF refused the server's metadata or file ({type(exc).__name__}: {text})")
    if isinstance(exc, DeserializationError | ValueError):
        return VerificationFailed(f"unusable metadata ({type(exc).__name__}: {text})")
    return UpdateError(f"cannot use the update state folder ({type(exc).__name__}: {text})")


__all__ = ["AssignedTarget", "BearerFetcher", "ServerUnreachable", "UpdateClient", "UpdateError",
           "VerificationFailed"]
