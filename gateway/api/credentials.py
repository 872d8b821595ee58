"""Routes over credentials: the CA certificate and CRL, a device's certificates, credential
reset, and attaching a certificate of an external CA.

The CRL is served as PEM, or as DER when the client asks for ``application/pkix-crl``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field

from gateway.api.auth import ADMIN, READ, context
from gateway.api.schemas import Registered, RequestBody, device_out, when
from gateway.core.clock import iso
from gateway.core.records import CertificateRecord

PEM = "application/x-pem-file"
DER_CRL = "application/pkix-crl"


class CertificateDetail(BaseModel):
    serial: str
    fingerprint_sha256: str
    not_before: str
    not_after: str
    created_at: str
    revoked_at: str | None
    first_used_at: str | None
    renews: str | None = Field(description="serial of the certificate this renewal replaces")
    source: str = Field(description="issued (by the gateway's CA) or attached (external CA)")


class CertificateList(BaseModel):
    data: list[CertificateDetail]


class CertificateEnvelope(BaseModel):
    data: CertificateDetail


class AttachIn(RequestBody):
    certificate: str = Field(min_length=1, max_length=16384, description="PEM certificate of an external CA")


def certificate_out(cert: CertificateRecord) -> CertificateDetail:
    return CertificateDetail(
        serial=cert.serial,
        fingerprint_sha256=cert.fingerprint_sha256,
        not_before=when(cert.not_before),
        not_after=when(cert.not_after),
        created_at=when(cert.created_at),
        revoked_at=iso(cert.revoked_at),
        first_used_at=iso(cert.first_used_at),
        renews=cert.renews,
        source=cert.source,
    )


def build_router() -> APIRouter:
    r = APIRouter(tags=["credentials"])

    @r.get("/ca/certificate", response_class=Response, responses={200: {"content": {PEM: {}}}})
    async def ca_certificate(request: Request) -> Response:
        """The gateway's root CA certificate (PEM): devices trust the gateway with it."""
        return Response(context(request).pki.ca_pem, media_type=PEM)

    @r.get("/ca/crl", response_class=Response, responses={200: {"content": {PEM: {}, DER_CRL: {}}}})
    async def ca_crl(request: Request) -> Response:
        """The current certificate revocation list: PEM, or DER with ``Accept: application/pkix-crl``."""
        pki = context(request).pki
        if DER_CRL in request.headers.get("accept", ""):
            return Response(pki.crl_der(), media_type=DER_CRL)
        return Response(pki.crl_pem(), media_type=PEM)

    @r.get("/devices/{device_id}/certificates", response_model=CertificateList, dependencies=[READ])
    async def certificates(device_id: str, request: Request) -> CertificateList:
        """Every certificate of the device, oldest first, revoked ones included."""
        found = await context(request).devices.certificates(device_id)
        return CertificateList(data=[certificate_out(c) for c in found])

    @r.post(
        "/devices/{device_id}/certificates",
        status_code=201,
        response_model=CertificateEnvelope,
        dependencies=[ADMIN],
    )
    async def attach(device_id: str, body: AttachIn, request: Request) -> CertificateEnvelope:
        """Bind a certificate of a configured external CA (``ca.external_anchors``) to the device."""
        cert = await context(request).devices.attach_certificate(device_id, body.certificate.encode("utf-8"))
        return CertificateEnvelope(data=certificate_out(cert))

    @r.post("/devices/{device_id}/credentials/reset", response_model=Registered, dependencies=[ADMIN])
    async def reset(
        device_id: str,
        request: Request,
        revoke_existing: Annotated[
            bool, Query(description="revoke every certificate and cut the session now")
        ] = False,
    ) -> Registered:
        """A fresh one-time registration token for the device.

        Without ``revoke_existing`` its certificates stay valid until it enrols with the
        new token; with it they are revoked (CRL, next handshake fails) and it is cut off.
        """
        reg = await context(request).devices.reset_credentials(device_id, revoke_existing=revoke_existing)
        return Registered(
            data=device_out(reg.device), registration_token=reg.token, token_expires_at=when(reg.expires_at)
        )

    return r
