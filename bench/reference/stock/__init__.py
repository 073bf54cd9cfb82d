"""The stock Channels pattern: one ``AsyncWebsocketConsumer`` per socket, one channels-redis group
per device (``group_add`` on connect, ``group_send`` to push), daphne, ``RedisChannelLayer`` with
its default settings unless ``STOCK_CAPACITY`` raises the capacity. No database."""
