from django.contrib import admin
from django.urls import path, re_path

from . import demo, health, views

urlpatterns = [
    # The routes polled most come first: Django tries the patterns in order.
    path("api/v3/<str:region>/<str:language>/chat/<str:device_id>/", views.chat),
    path("api/v3/webhook/zammad/", views.zammad_webhook),
    path("healthz", views.healthz),
    path("readyz", health.readyz),
    path("metrics", health.metrics_view),
    path("api/v3/openapi.yaml", views.openapi),
    path("api/v3/<str:region>/<str:device_id>/is_chat_enabled/", views.is_chat_enabled),
    path(
        "api/v3/<str:region>/<str:language>/chat/<str:device_id>/attachments/<str:token>/",
        views.attachment,
    ),
    path(
        "<str:region>/<str:language>/wp-json/extensions/v3/chat/<str:device_id>/",
        views.chat,
    ),
    # The browser demo client (chatserver/demo.py): a 404 unless CHAT_DEMO_PAGE is on.
    path("demo/", demo.page, name="chat-demo"),
    path("demo/console/", demo.console, name="chat-demo-console"),
    path("demo/<str:name>", demo.asset, name="chat-demo-asset"),
    path("admin/", admin.site.urls),
    # Anything else under the API prefixes (a device id with a slash, say) is a JSON 404.
    re_path(r"^api/", views.not_found),
    re_path(r"^.+/wp-json/", views.not_found),
]
