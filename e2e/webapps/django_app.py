"""A single-module Django 5.2 ASGI app (async and sync views, JSON, POST)."""

import json

import django
from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="e2e-not-secret",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["*"],
    MIDDLEWARE=["django.middleware.common.CommonMiddleware"],
    INSTALLED_APPS=[],
    DATABASES={},
    USE_TZ=True,
)
django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402
from django.http import HttpResponse, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


async def index(request):
    return HttpResponse("django async view")


def sync_view(request, number):
    return JsonResponse({"number": number, "double": number * 2, "q": request.GET.get("q")})


async def post_json(request):
    if request.method != "POST":
        return HttpResponse(status=405)
    data = json.loads(request.body)
    return JsonResponse({"received": data, "path": request.path})


urlpatterns = [
    path("", index),
    path("n/<int:number>/", sync_view),
    path("post/", post_json),
]

application = get_asgi_application()
