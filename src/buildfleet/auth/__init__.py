"""Authentication: who a caller is (a principal with grants), from a bearer token, a
JSON Web Token or a verified client certificate; the TLS credentials of the
listeners; the audit log of refused calls.  Nothing here knows gRPC's services:
which method needs which role is `buildfleet.server.auth`'s table."""
