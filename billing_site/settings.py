"""Settings: one file, every knob from the environment (django-environ).

With nothing set, the site runs on the embedded defaults of `make run`: a SQLite file, database
rate-limit counters, an SQLite Celery broker, the console e-mail backend and a local fake Stripe.
"""

import warnings
from datetime import timedelta
from pathlib import Path

import environ
from csp.constants import NONE, SELF

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=False)
# The development key starts "django-insecure-" so that `check --deploy` refuses it (security.W009).
SECRET_KEY = env.str(
    "DJANGO_SECRET_KEY", default="django-insecure-dev-only-key-change-me-in-production-0123456789"
)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "template_partials",
    "ninja",
    "auditlog",
    "axes",
    "accounts",
    "usage",
    "invoices",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "usage.api_middleware.MeteringApiMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "auditlog.middleware.AuditlogMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    "axes.middleware.AxesMiddleware",  # last, as django-axes asks: it turns a lock-out into the page
]

ROOT_URLCONF = "billing_site.urls"
WSGI_APPLICATION = "billing_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "accounts.context_processors.navigation",
            ],
        },
    },
]

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL and a busy timeout let the web server and the worker share the file.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 20,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DATABASE_CONN_MAX_AGE", default=60)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
    # psycopg prepares a statement after 5 runs on a connection, but only for the few hot ones sent
    # through billing_site.rows.planned_cursor (Django's own cursors bind on the client and never
    # prepare). Behind a transaction-pooling PgBouncer older than 1.21, set it to "" (never).
    threshold = env.str("DATABASE_PREPARE_THRESHOLD", default="5")
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = (
        int(threshold) if threshold else None
    )
    DATABASES["default"].setdefault("TEST", {})["NAME"] = env.str(
        "DATABASE_TEST_NAME", default="test_billing"
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    # django-redis rather than Django's own RedisCache, which builds a new client (with its table
    # of ~170 response callbacks) for every cache call; django-redis keeps one per server.
    CACHES = {"default": {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": REDIS_URL}}
    # Sessions read from Redis and written through to the database, so a Redis flush signs nobody out.
    SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}

AUTH_USER_MODEL = "accounts.User"
# django-axes first: it refuses a locked-out username + address before the password is checked.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/settings/billing/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

LANGUAGE_CODE = "en-gb"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
MEDIA_ROOT = env.path("MEDIA_ROOT", default=BASE_DIR / "media")
WHITENOISE_USE_FINDERS = True  # serve straight from static/ and the apps: no collectstatic step
warnings.filterwarnings("ignore", "No directory at", UserWarning, "django.core.handlers.base")
WHITENOISE_AUTOREFRESH = DEBUG

EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env.str("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env.str("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env.str("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="billing@example.com")
STAFF_EMAIL = env.str("STAFF_EMAIL", default="sales@example.com")

# Cookies: HttpOnly and SameSite=Lax always; Secure (and HTTPS redirect + HSTS) when
# DJANGO_SECURE_COOKIES is on, as in production. The CSRF cookie is HttpOnly too: htmx gets the
# token from the page (`hx-headers` on <body>), never from document.cookie.
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = "Lax"
CSRF_COOKIE_SAMESITE = "Lax"
SESSION_COOKIE_SECURE = env.bool("DJANGO_SECURE_COOKIES", default=False)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
SECURE_SSL_REDIRECT = env.bool("DJANGO_SSL_REDIRECT", default=SESSION_COOKIE_SECURE)
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]  # the load balancer's probe speaks plain HTTP
SECURE_HSTS_SECONDS = env.int("DJANGO_HSTS_SECONDS", default=31_536_000 if SESSION_COOKIE_SECURE else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", default=True)
# "preload" in the header only offers the domain to the browsers' HTTPS-only list; it is on the
# list once someone submits it (hstspreload.org), which is the operator's decision.
SECURE_HSTS_PRELOAD = env.bool("DJANGO_HSTS_PRELOAD", default=SESSION_COOKIE_SECURE)
if env.bool("DJANGO_BEHIND_TLS_PROXY", default=False):  # the proxy terminates TLS and says so
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

# Content security policy (django-csp): our own files only; no inline script or style, no eval.
# Charts arrive as JSON (json_script) drawn by static/js/charts.js; plotly.js's own rules are the
# file static/vendor/plotly.css. The Payment methods page adds Stripe.js's origins for itself
# (invoices.stripe_gateway.csp_sources): localstripe's in development, Stripe's in production.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF],
        "img-src": [SELF, "data:"],  # a chart's "Download plot as a PNG" draws it via a data: image
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# Sign-in throttling (django-axes): 5 failures for one e-mail from one address lock that pair
# out for 15 minutes (another address, or the password-reset link, still works). Attempts are
# rows in the database, so every web process sees them and staff can clear them in admin.
AXES_FAILURE_LIMIT = env.int("AXES_FAILURE_LIMIT", default=5)
AXES_COOLOFF_TIME = timedelta(minutes=env.int("AXES_COOLOFF_MINUTES", default=15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_USERNAME_CALLABLE = "accounts.sign_in_throttle.username"
AXES_LOCKOUT_CALLABLE = "accounts.sign_in_throttle.locked_out"
AXES_RESET_ON_SUCCESS = True
# The client address is REMOTE_ADDR unless the proxy in front is trusted to set X-Forwarded-For:
# a header the client writes itself must never pick the address it is counted under.
AXES_IPWARE_META_PRECEDENCE_ORDER = env.tuple("AXES_IP_HEADERS", default=("REMOTE_ADDR",))

# Celery: Redis when REDIS_URL is set, otherwise an embedded SQLite broker (no server needed).
CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL",
    default=REDIS_URL or f"sqlalchemy+sqlite:///{BASE_DIR / 'celery-broker.sqlite'}",
)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_IGNORE_RESULT = True
CELERY_TIMEZONE = "UTC"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = env.str(
    "CELERY_BEAT_SCHEDULE_FILENAME", default=str(BASE_DIR / "celerybeat-schedule")
)
CELERY_BEAT_SCHEDULE = {
    # The same due jobs as `manage.py billing_tick`, every minute; each is idempotent.
    "billing-tick": {"task": "billing.tick", "schedule": env.float("BILLING_TICK_SECONDS", default=60.0)},
    # Invoice PDFs, rendered by a worker apart from the tick (a download renders its own at once).
    "invoice-pdfs": {"task": "invoices.pdfs_render", "schedule": 60.0},
}

# Stripe: a local fake (localstripe) when STRIPE_API_BASE is set, real Stripe otherwise.
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="")
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="sk_test_localstripe")
STRIPE_PUBLISHABLE_KEY = env.str("STRIPE_PUBLISHABLE_KEY", default="pk_test_localstripe")
STRIPE_WEBHOOK_SECRET = env.str("STRIPE_WEBHOOK_SECRET", default="whsec_localstripe")
# Seconds before a Stripe call gives up (the SDK never retries: one call, at most one PaymentIntent).
STRIPE_TIMEOUT_SECONDS = env.int("STRIPE_TIMEOUT_SECONDS", default=20)

# Invoices: tax as a percentage of the subtotal (half-up to the cent), and who issues them.
INVOICE_TAX_RATE = env.str("INVOICE_TAX_RATE", default="0")
SELLER_NAME = env.str("SELLER_NAME", default="DocAI Ltd")
SELLER_ADDRESS = env.str("SELLER_ADDRESS", default="1 Example Street, London EC1A 1AA, United Kingdom")
SELLER_EMAIL = env.str("SELLER_EMAIL", default="billing@example.com")
SELLER_TAX_ID = env.str("SELLER_TAX_ID", default="")

# How long a job may run before billing_tick fails it and releases its hold.
STALE_JOB_HOURS = env.int("STALE_JOB_HOURS", default=24)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="WARNING")},
}
