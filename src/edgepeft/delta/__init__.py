"""delta layer: the artifact that travels to devices.

One signed ``.edelta`` file per adapter version (see :mod:`edgepeft.delta.bundle` for the layout):
``pack_bundle`` on the release server; ``read_bundle`` / ``verify_bundle`` / ``bundle_files`` (or
``unpack_bundle``) on the device.
Importing this package pulls in neither torch nor peft.
"""

from edgepeft.delta.bundle import Bundle, read_bundle, verify_bundle
from edgepeft.delta.errors import BundleError
from edgepeft.delta.keys import generate_key, key_id, load_private_key, load_public_key, save_keypair
from edgepeft.delta.pack import (
    BundleFiles,
    bundle_files,
    pack_bundle,
    read_bundle_file,
    unpack_bundle,
    write_bundle,
)

__all__ = [
    "Bundle",
    "BundleError",
    "BundleFiles",
    "bundle_files",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "pack_bundle",
    "read_bundle",
    "read_bundle_file",
    "save_keypair",
    "unpack_bundle",
    "verify_bundle",
    "write_bundle",
]
