"""Images in requests: find them in a request body, decode them, hold them to the limits.

Every family sends images as base64 text (OpenAI's `image_url` parts with `data:` URIs,
llama-server's `image_data`, KoboldCpp's and Ollama's `images`). They are decoded here with
Pillow, on a worker thread (routes call `decode_images` inside their off-loop work), into
RGB pixels for the engine. The pixel count is read from the image header before the pixels
are decoded, so a small file that unpacks to a huge image (a decompression bomb) is refused
without being unpacked. Remote `http(s)` URLs are refused: the server fetches nothing.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from PIL import Image, UnidentifiedImageError

from innkeeper.api.errors import ApiError
from innkeeper.engine.vision import MARKER, ImageInput, MediaPrompt

if TYPE_CHECKING:
    from innkeeper.serving.service import Service

IMG_TAG = re.compile(r"\[img-(\d+)\]")  # llama-server's (and SillyTavern's) image placeholder


@dataclass(frozen=True)
class ImageLimits:
    """--max-images and --max-image-pixels."""

    max_images: int
    max_pixels: int


def limits_of(request: Request) -> ImageLimits:
    config = request.app.state.config
    return ImageLimits(config.max_images, config.max_image_pixels)


def no_vision(model_id: str) -> ApiError:
    """The 400 for images sent to a model that has no projector."""
    return ImageError(
        f"model {model_id!r} cannot take images: it was loaded without a vision projector "
        "(put its mmproj-*.gguf beside it, or serve it with --mmproj FILE)"
    )


class ImageError(ApiError):
    """An image the request carries that cannot be used: a 400 (413 over a size limit)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(status, message)


def check_count(n: int, limits: ImageLimits) -> None:
    if n > limits.max_images:
        raise ImageError(
            f"the request has {n} images; this server takes at most {limits.max_images} "
            "(--max-images)",
            413,
        )


def from_data_uri(url: str) -> bytes:
    """The bytes of a `data:image/...;base64,...` URI (or of bare base64 text)."""
    url = url.strip()
    low = url[:16].lower()
    if low.startswith(("http://", "https://")):
        raise ImageError(
            "remote image URLs are not fetched: send the image inline as a data: URI "
            "(data:image/png;base64,...)"
        )
    if low.startswith("data:"):
        head, sep, data = url.partition(",")
        if not sep or ";base64" not in head.lower():
            raise ImageError("an image data: URI must be base64 (data:image/png;base64,...)")
        url = data
    return b64(url)


def b64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageError(f"an image is not valid base64: {exc}") from None


def chat_images(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Chat messages with each image part replaced by the engine's image marker (text parts
    joined around it), and the images' bytes in order. Messages without images are kept."""
    out: list[dict[str, Any]] = []
    found: list[bytes] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list) or not any(_is_image(p) for p in content):
            out.append(msg)
            continue
        text = []
        for part in content:
            if not isinstance(part, dict):
                continue
            if _is_image(part):
                found.append(from_data_uri(_image_url(part)))
                text.append(MARKER)
            else:
                text.append(str(part.get("text", "")))
        out.append({**msg, "content": "".join(text)})
    return out, found


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("image_url", "input_image")


def _image_url(part: dict[str, Any]) -> str:
    url = part.get("image_url")
    if isinstance(url, dict):
        url = url.get("url")
    if not isinstance(url, str) or not url:
        raise ImageError("an image_url part needs a url (a data:image/...;base64 URI)")
    return url


def tagged_images(prompt: str, images: dict[int, bytes]) -> tuple[str, list[bytes]]:
    """llama-server's `image_data`: each `[img-ID]` in the prompt becomes the image with that
    id; images the prompt does not name go before it, in the order sent."""
    order: list[bytes] = []

    def sub(m: re.Match[str]) -> str:
        key = int(m.group(1))
        if key not in images:
            raise ImageError(f"the prompt names [img-{key}] but image_data has no image {key}")
        order.append(images[key])
        return MARKER

    text = IMG_TAG.sub(sub, prompt)
    named = set(int(k) for k in IMG_TAG.findall(prompt))
    unnamed = [raw for key, raw in images.items() if key not in named]
    return MARKER * len(unnamed) + text, unnamed + order


def media_prompt(
    service: Service, text: str, raw: list[bytes], limits: ImageLimits, limit: int
) -> MediaPrompt:
    """Decode `raw` and tokenize `text` (one MARKER per image) for `service`'s model (a
    worker thread); a model without projector is a 400 that says so."""
    if not service.vision:
        raise no_vision(service.model_id)
    return service.tokenize_media_now(text, decode_images(raw, limits), limit=limit)


def decode_images(raw: list[bytes], limits: ImageLimits) -> list[ImageInput]:
    """Decode images to RGB (a worker thread: decoding grows with the pixels)."""
    check_count(len(raw), limits)
    return [decode_image(data, i, limits) for i, data in enumerate(raw, 1)]


def decode_image(data: bytes, index: int, limits: ImageLimits) -> ImageInput:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise ImageError(
                    f"image {index} is {w}x{h} = {w * h} pixels; this server takes at most "
                    f"{limits.max_pixels} (--max-image-pixels)",
                    413,
                )
            img.seek(0)
            rgb = img.convert("RGB")
            return ImageInput(w, h, rgb.tobytes())
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image {index} is too large: {exc}", 413) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"image {index} is not a readable image ({type(exc).__name__})") from None
