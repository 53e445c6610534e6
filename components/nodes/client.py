"""Node kind `client`: a person's device (a laptop, a phone), which the program never logs in to.

The program makes its WireGuard key (and the key it shares with the hub) like any node's, and the
hub takes it as a peer; the device gets the rest as a secret output: its wg-quick config, and the
same config as a QR code, a PNG and text for a terminal (made with `qrcode`, PyPI). It runs no
role. What it may reach is its `allow` (topology.ClientFlow: the hub's and each spoke's rulesets);
nothing may open a connection to it.
"""
from __future__ import annotations

import base64
import io

import pulumi
import qrcode
import qrcode.image.pure

from .. import render
from ..config import NetworkConfig, SpokeConfig
from ..roles import wireguard

# A client's config with a preshared key is about 300 bytes: QR version 13 (69 modules a side) at
# level M, which a phone's camera reads off a screen (the config has no comment line: each byte
# makes the code denser).
ERROR_CORRECTION = qrcode.constants.ERROR_CORRECT_M


def config(cfg: NetworkConfig, spoke: SpokeConfig, private_key: str, preshared_key: str | None,
           hub_public_key: str, hub_endpoint: str) -> str:
    """The device's wg-quick config: its key and address, the hub as its one peer for the overlay."""
    path = spoke.mtu or cfg.mtu
    return render.render("wireguard/client.conf", private_key=private_key, address=spoke.address,
                         mtu=None if path is None else path - wireguard.WIREGUARD_OVERHEAD,
                         hub_public_key=hub_public_key, preshared_key=preshared_key,
                         endpoint=f"{hub_endpoint}:{cfg.listen_port}", overlay=cfg.overlay)


def _qr(text: str) -> qrcode.QRCode:
    qr = qrcode.QRCode(error_correction=ERROR_CORRECTION, box_size=6, border=4)
    qr.add_data(text.encode())
    qr.make(fit=True)
    return qr


def qr_png(text: str) -> bytes:
    """The config as a QR code, a PNG (pure Python: pypng)."""
    out = io.BytesIO()
    _qr(text).make_image(image_factory=qrcode.image.pure.PyPNGImage).save(out)
    return out.getvalue()


def qr_text(text: str) -> str:
    """The config as a QR code in text, two rows to a line (Unicode half blocks), light modules
    drawn: for a terminal with a dark background, as `qrencode -t utf8` prints one."""
    out = io.StringIO()
    _qr(text).print_ascii(out=out, invert=True)
    return out.getvalue()


def outputs(cfg: NetworkConfig, spoke: SpokeConfig, private_key: pulumi.Input[str],
            preshared_key: pulumi.Input[str] | None, hub_public_key: pulumi.Input[str],
            hub_endpoint: pulumi.Input[str]) -> pulumi.Output[dict]:
    """The client's output (secret: the config holds its keys): config, qrPng (base64), qrText."""
    def make(v) -> dict:
        text = config(cfg, spoke, *v)
        return {"config": text, "qrPng": base64.b64encode(qr_png(text)).decode(), "qrText": qr_text(text)}
    return pulumi.Output.secret(pulumi.Output.all(private_key, preshared_key, hub_public_key, hub_endpoint).apply(make))
