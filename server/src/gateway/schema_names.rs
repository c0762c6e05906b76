//! Names of the schemas the OpenAPI document writes by hand (the proto messages and
//! the error shape), as types the handlers' `#[utoipa::path]` attributes can name.
//! A leaf: the handlers and the document both import it, neither imports the other
//! for it.

use std::borrow::Cow;

use utoipa::openapi::{RefOr, schema::Schema};

/// Types that stand for a schema in the handlers' `#[utoipa::path]` attributes:
/// utoipa refers to them by name, and `openapi::document` puts in the schema itself.
macro_rules! schema_types {
    ($($ty:ident => $name:literal),* $(,)?) => {$(
        #[doc = concat!("The `", $name, "` schema in `#[utoipa::path]` attributes.")]
        pub(crate) struct $ty;

        impl utoipa::PartialSchema for $ty {
            fn schema() -> RefOr<Schema> {
                RefOr::T(Schema::default())
            }
        }

        impl utoipa::ToSchema for $ty {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    )*};
}

schema_types!(
    ErrorBody => "Error",
    StatusBody => "Status",
    IngestBody => "IngestBody",
    IngestResponseBody => "IngestResponse",
    AnalyzeBody => "AnalyzeDocument",
    AnomalyEventBody => "WatchAnomaliesResponse",
    DeleteDeviceBody => "DeleteDeviceResponse",
);
