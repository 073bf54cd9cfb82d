from django.apps import AppConfig


class ChatserverConfig(AppConfig):
    name = "chatserver"
    verbose_name = "Integreat chat"
    default_auto_field = "django.db.models.BigAutoField"
