"""Signed model packages (manifest + model + OpenSSF model-signing signature)."""

from keiryo.packages.package import MANIFEST, check_name, check_version, package, read_manifest, verify
from keiryo.packages.signing import SIGNATURE, keygen

__all__ = ["MANIFEST", "SIGNATURE", "check_name", "check_version", "keygen", "package", "read_manifest", "verify"]
