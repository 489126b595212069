# A demo Dovecot for deploy/compose.yaml: user "demo", seeded with the fixture corpus.
# Throw-away credentials for a demo only. Build context: the repository root.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends dovecot-imapd dovecot-pop3d openssl python3 \
 && rm -rf /var/lib/apt/lists/*
COPY tests/dovecot/dovecot.conf.in /opt/mailpump/tests/dovecot/dovecot.conf.in
COPY deploy/services.sh /opt/mailpump/deploy/services.sh
COPY tests/fixtures/parse /opt/mailpump/fixtures
RUN sed -i 's/^listen = 127.0.0.1/listen = */; s/address = 127.0.0.1/address = */' /opt/mailpump/tests/dovecot/dovecot.conf.in \
 && bash /opt/mailpump/deploy/services.sh dovecot-config /srv/dovecot 143 993 110 995 \
 && bash /opt/mailpump/deploy/services.sh add-user /srv/dovecot demo demo-password 20999 \
 && bash /opt/mailpump/deploy/services.sh deliver /srv/dovecot demo /opt/mailpump/fixtures/*.eml
EXPOSE 143 993
CMD ["dovecot", "-F", "-c", "/srv/dovecot/dovecot.conf"]
