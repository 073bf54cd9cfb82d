"""``POST /push/<device>/``: the body is sent to the device's group as one text frame, as a
Django async view doing ``group_send`` (the way a webhook view would push)."""

from __future__ import annotations

from channels.layers import get_channel_layer
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from bench.reference.stock.consumers import group_name


@csrf_exempt
async def push(request: HttpRequest, device: str) -> HttpResponse:
    if request.method != "POST":
        return HttpResponse(status=405)
    layer = get_channel_layer()
    assert layer is not None
    await layer.group_send(
        group_name(device), {"type": "push.frame", "text": request.body.decode()}
    )
    return JsonResponse({"outcome": "message"})


async def healthz(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok\n", content_type="text/plain")


urlpatterns = [
    path("push/<str:device>/", push),
    path("healthz", healthz),
]
