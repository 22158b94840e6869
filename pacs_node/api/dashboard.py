"""The dashboard: ``/`` (jobs table) and ``/jobs/{id}`` (one job), plain HTML
pages whose JavaScript polls the JSON API every 3 s, and the server-side key
images of a job (``/jobs/{id}/keyimages`` and ``/jobs/{id}/keyimages/{n}.png``).

The pages themselves (``/``, ``/jobs/{id}``, ``/login``) hold no data and are
served without a token; every data endpoint needs the ``read`` scope. A page
whose data request answers 401 sends the browser to ``/login``, which
exchanges a token for an HttpOnly session cookie (:mod:`pacs_node.api.session`):
the pages' requests and the key images' ``<img>`` tags then carry the cookie,
and the retry button sends the session's CSRF token. Nothing is loaded from
outside the node.
"""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path as PathParam, Query, Request, status
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from pacs_node.api.auth import ReadAuth
from pacs_node.api.deps import NodeDep
from pacs_node.api.render import KeyImagePlan, plan_key_images, render_key_image

__all__ = ["KeyImageOut", "KeyImagesOut", "STATIC_DIR", "router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["dashboard"])

STATIC_DIR = Path(str(resources.files("pacs_node.api") / "static"))

#: Pages load scripts, styles and images from the node only.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
#: One key image per finding, at most this many (the largest findings).
_MAX_KEY_IMAGES = 8


class KeyImageOut(BaseModel):
    """One key image of a job."""

    n: int
    url: str
    sop_instance_uid: str
    slice_index: int
    area_px: int
    outlined: bool
    #: The finding shown (1 = the largest); None for the middle slice.
    finding: int | None = None


class KeyImagesOut(BaseModel):
    """The key images of a job and what they show."""

    job_id: int
    state: str
    has_seg: bool
    has_findings: bool
    slices: int
    #: Findings in the SEG (key images are capped at the largest ones).
    findings: int = 0
    message: str
    images: list[KeyImageOut]


def _page(name: str) -> HTMLResponse:
    return HTMLResponse((STATIC_DIR / name).read_text(encoding="utf-8"), headers=_PAGE_HEADERS)


@router.get("/", response_class=HTMLResponse, summary="Dashboard: jobs table", include_in_schema=False)
def index_page() -> HTMLResponse:
    """The jobs table page.

    Returns
    -------
    HTMLResponse
        ``static/index.html``.
    """
    return _page("index.html")


@router.get("/login", response_class=HTMLResponse, summary="Dashboard: log in with a token", include_in_schema=False)
def login_page() -> HTMLResponse:
    """The login form (a token is exchanged for a session cookie).

    Returns
    -------
    HTMLResponse
        ``static/login.html``.
    """
    return _page("login.html")


@router.get("/jobs/{job_id}", response_class=HTMLResponse, summary="Dashboard: one job", include_in_schema=False)
def job_page(job_id: int) -> HTMLResponse:
    """The page of one job (its data is fetched by the page's script).

    Parameters
    ----------
    job_id:
        Job id.

    Returns
    -------
    HTMLResponse
        ``static/job.html``.
    """
    return _page("job.html")


def _message(plan: KeyImagePlan) -> str:
    if plan.has_findings:
        shown = len(plan.images)
        if plan.findings > shown:
            return f"{shown} key image(s) for the {shown} largest of {plan.findings} findings, largest first"
        return f"{shown} key image(s), one per finding, largest anomaly first"
    if not plan.images:
        return "no findings; source images not available on this node"
    if plan.state != "done" and not plan.has_seg:
        return f"no findings (job is {plan.state}); middle slice shown"
    return "no findings; middle slice shown"


def _plan_or_404(node: NodeDep, job_id: int) -> KeyImagePlan:
    plan = plan_key_images(node, job_id, max_images=_MAX_KEY_IMAGES)
    if plan is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return plan


@router.get(
    "/jobs/{job_id}/keyimages",
    response_model=KeyImagesOut,
    dependencies=[ReadAuth],
    responses={401: {"description": "not logged in / no bearer token"}, 403: {"description": "no read scope"},
               404: {"description": "no such job"}},
    summary="Key images of a job (one per finding, at its largest area)",
)
def key_images(job_id: int, node: NodeDep, request: Request) -> KeyImagesOut:
    """List the key images of a job.

    Parameters
    ----------
    job_id:
        Job id.
    node:
        The node.
    request:
        The current request (for the image URLs).

    Returns
    -------
    KeyImagesOut
        The images and a message (``no findings ...`` without a mask).
    """
    plan = _plan_or_404(node, job_id)
    images = [
        KeyImageOut(
            n=k.n,
            url=str(request.url_for("key_image_png", job_id=job_id, n=k.n).path),
            sop_instance_uid=k.sop_instance_uid,
            slice_index=k.slice_index,
            area_px=k.area_px,
            outlined=k.area_px > 0,
            finding=k.finding,
        )
        for k in plan.images
    ]
    return KeyImagesOut(
        job_id=job_id,
        state=plan.state,
        has_seg=plan.has_seg,
        has_findings=plan.has_findings,
        slices=plan.slices,
        findings=plan.findings,
        message=_message(plan),
        images=images,
    )


@router.get(
    "/jobs/{job_id}/keyimages/{n}.png",
    name="key_image_png",
    dependencies=[ReadAuth],
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 401: {"description": "not logged in / no bearer token"},
               403: {"description": "no read scope"}, 404: {"description": "no such job or image"},
               500: {"description": "the source slice cannot be rendered (unreadable or without pixel data)"}},
    summary="Key image n of a job as PNG, anomaly outlined in red",
)
def key_image_png(
    job_id: int,
    n: Annotated[int, PathParam(ge=0, le=_MAX_KEY_IMAGES - 1)],
    node: NodeDep,
    download: Annotated[bool, Query(description="ask the browser to save the file")] = False,
) -> Response:
    """Render key image ``n`` (0 = the largest finding) of a job.

    Parameters
    ----------
    job_id:
        Job id.
    n:
        Key image index.
    node:
        The node.
    download:
        Send ``Content-Disposition: attachment``.

    Returns
    -------
    Response
        ``image/png`` at the source slice's resolution.

    Raises
    ------
    HTTPException
        404 when the job or the image does not exist, 500 when the slice
        cannot be rendered (the detail names the image, not the patient).
    """
    plan = _plan_or_404(node, job_id)
    try:
        png = render_key_image(plan, n)
    except Exception as exc:  # noqa: BLE001 - a broken slice: this image fails, the others still render
        logger.warning("job %d: key image %d cannot be rendered: %s", job_id, n, exc.__class__.__name__)
        raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR,
                            f"key image {n} cannot be rendered ({exc.__class__.__name__})") from None
    if png is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no key image {n}")
    # Patient images: kept out of shared caches (private) and revalidated.
    headers = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="job-{job_id}-key-{n}.png"'
    return Response(png, media_type="image/png", headers=headers)
